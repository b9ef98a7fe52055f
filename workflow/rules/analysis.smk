# The analysis of every run (loss curves, verification, progress measures) and a summary of each grid.


localrules:
    summarize,


# A converted run's analysis (a trained run's is part of its training job, train.smk): loss curves,
# verification, then the progress measures (legacy runs are the demo's model, which has them).
# Its own job, so a conversion that does not verify keeps the files it made.


ruleorder: analyze > train


rule analyze:
    input:
        # Only a run that has its pickle: the wildcard patterns below admit a grid run whose prime
        # and seed each occur among the legacy runs; without this input it would be analysed here
        # (and trained by `train`, which makes these outputs too).
        legacy=f"{LEGACY}/{{model_name}}/{{model_name}}_p{{prime}}_seed{{seed}}.pth",
        model=f"{RUN}/{{model_name}}_p{{prime}}_seed{{seed}}.safetensors",
        config=f"{RUN}/config.json",
        metadata=f"{RUN}/metadata.json",
    output:
        **ANALYSIS_OUTPUTS,
        **PROGRESS_OUTPUTS,
    log:
        "logs/{model_name}/analyze/{model_name}_p{prime}_seed{seed}.log",
    wildcard_constraints:
        model_name=legacy_pattern("model_name"),
        prime=legacy_pattern("prime"),
        seed=legacy_pattern("seed"),
    conda:
        CONDA_ENV
    threads: 1
    params:
        run_dir=run_dir,
        progress=progress_flags(),
    shell:
        "grokpipe analyze {params.run_dir:q} --report {output.verification:q} --threads {threads}"
        " {params.progress} > {log:q} 2>&1"


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
