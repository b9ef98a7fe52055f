# Verification and analysis artifacts of every run, and a summary of each grid.


localrules:
    summarize,


# One job checks a run and draws its loss curves: each job costs Snakemake ~2.5 ms of DAG work (a plot
# job per run was ~18 % of a 1,000-run dry run) and, on a cluster, one more submission.
# The curves are drawn first, from metadata.json alone; a failed check fails the job (and Snakemake
# removes its figures with it), while verification.json in the run keeps what was found.
rule verify:
    input:
        model=f"{RUN}/{{model_name}}_p{{prime}}_seed{{seed}}.safetensors",
        config=f"{RUN}/config.json",
        metadata=f"{RUN}/metadata.json",
    output:
        report=f"{RUN}/verify.json",
        png=report(
            f"{RUN}/artifacts/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="Loss curves",
            labels={"model": "{model_name}", "prime": "{prime}", "seed": "{seed}"},
        ),
        svg=f"{RUN}/artifacts/loss_curves.svg",
    log:
        "logs/{model_name}/verify/{model_name}_p{prime}_seed{seed}.log",
    conda:
        CONDA_ENV
    threads: 1
    params:
        run_dir=run_dir,
    shell:
        "grokpipe plot {params.run_dir:q} > {log:q} 2>&1"
        " && grokpipe verify {params.run_dir:q} --report {output.report:q} >> {log:q} 2>&1"


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
