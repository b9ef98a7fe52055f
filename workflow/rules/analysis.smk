# The analysis of every run (loss curves, verification, progress measures) and a summary of each grid.


localrules:
    summarize,


# One job per run draws its loss curves, checks it and computes its progress measures: each job
# costs Snakemake ~2.5 ms of DAG work (separate plot and progress jobs were ~45 % of a 1,000-run dry
# run), on a cluster one more submission, and each `grokpipe` process imports torch again.
# The curves come first (from metadata.json alone); a failed check fails the job before the
# measures (Snakemake removes the job's outputs), while verification.json in the run keeps what
# was found. Runs of cells without progress measures (another operation, a deeper model) take
# analyze_without_progress below: the same job, fewer outputs.
# A dict literal: Snakemake's parser would read a line starting with report= as its keyword.
ANALYSIS_OUTPUTS = {
    "report": f"{RUN}/verify.json",
    "curves_png": report(
        f"{RUN}/artifacts/loss_curves.png",
        caption="../report/loss_curves.rst",
        category="Loss curves",
        labels={"model": "{model_name}", "prime": "{prime}", "seed": "{seed}"},
    ),
    "curves_svg": f"{RUN}/artifacts/loss_curves.svg",
}


rule analyze:
    input:
        unpack(trained_inputs),
    output:
        **PROGRESS_OUTPUTS,
        **ANALYSIS_OUTPUTS,
    log:
        "logs/{model_name}/analyze/{model_name}_p{prime}_seed{seed}.log",
    wildcard_constraints:
        model_name=analyzed_with_progress(),
    conda:
        CONDA_ENV
    threads: 1
    params:
        run_dir=run_dir,
        progress=f"--progress --key-frequencies {key_frequencies_flag()}",
    shell:
        "grokpipe analyze {params.run_dir:q} --report {output.report:q} {params.progress}"
        " > {log:q} 2>&1"


use rule analyze as analyze_without_progress with:
    output:
        **ANALYSIS_OUTPUTS,
    wildcard_constraints:
        model_name=analyzed_without_progress(),
    params:
        run_dir=run_dir,
        progress="",


rule summarize:
    input:
        runs_of_model,
    output:
        csv=f"{RESULTS}/{{model_name}}/summary.csv",
        md=f"{RESULTS}/{{model_name}}/summary.md",
        png=report(
            f"{RESULTS}/{{model_name}}/test_curves.png",
            caption="../report/test_curves.rst",
            category="Grid",
            labels={"model": "{model_name}", "figure": "test loss of every run"},
        ),
        svg=f"{RESULTS}/{{model_name}}/test_curves.svg",
    log:
        "logs/{model_name}/summarize.log",
    conda:
        CONDA_ENV
    threads: 1
    params:
        run_dirs=run_dirs_of,
        out_dir=lambda wildcards: f"{RESULTS}/{wildcards.model_name}",
    shell:
        "grokpipe summarize --out-dir {params.out_dir:q} {params.run_dirs:q} > {log:q} 2>&1"
