# Progress measures (Nanda et al. 2023) over every checkpoint of a run: restricted and excluded loss,
# sum of squared weights, Gini coefficients of the Fourier norms, and the key frequencies.
# The analysis job of every run whose cell has them computes them (analysis.smk); this rule serves
# legacy runs (the demo's model) placed under a cell whose own runs have none.

PROGRESS_OUTPUTS = dict(
    progress_csv=f"{RUN}/artifacts/progress_measures.csv",
    key_frequencies=f"{RUN}/artifacts/key_frequencies.json",
    progress_png=report(
        f"{RUN}/artifacts/progress_measures.png",
        caption="../report/progress_measures.rst",
        category="Progress measures",
        labels={"model": "{model_name}", "prime": "{prime}", "seed": "{seed}"},
    ),
    progress_svg=f"{RUN}/artifacts/progress_measures.svg",
)


rule progress:
    input:
        unpack(trained_inputs),
    output:
        **PROGRESS_OUTPUTS,
    log:
        "logs/{model_name}/progress/{model_name}_p{prime}_seed{seed}.log",
    wildcard_constraints:
        model_name=legacy_without_progress_cell(),
    conda:
        CONDA_ENV
    threads: 1
    params:
        run_dir=run_dir,
        key_frequencies=key_frequencies_flag(),
    shell:
        "grokpipe progress {params.run_dir:q} --key-frequencies {params.key_frequencies}"
        " > {log:q} 2>&1"
