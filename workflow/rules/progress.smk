# Progress measures (Nanda et al. 2023) over every checkpoint of a run: restricted and excluded loss,
# sum of squared weights, Gini coefficients of the Fourier norms, and the key frequencies.
# When the grid's model has them, every run's analysis job (analysis.smk) computes them; this rule
# is then not defined. Otherwise only legacy runs (the demo's model) have them, from this rule.

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


if not GRID_HAS_PROGRESS:

    rule progress:
        input:
            model=f"{RUN}/{{model_name}}_p{{prime}}_seed{{seed}}.safetensors",
            config=f"{RUN}/config.json",
            metadata=f"{RUN}/metadata.json",
        output:
            **PROGRESS_OUTPUTS,
        log:
            "logs/{model_name}/progress/{model_name}_p{prime}_seed{seed}.log",
        conda:
            CONDA_ENV
        threads: 1
        params:
            run_dir=run_dir,
            key_frequencies=key_frequencies_flag(),
        shell:
            "grokpipe progress {params.run_dir:q} --key-frequencies {params.key_frequencies}"
            " > {log:q} 2>&1"
