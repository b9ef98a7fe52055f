# A legacy pickle at legacy/{model_name}/{model_name}_p{prime}_seed{seed}.pth becomes that run's
# directory: asking for the run converts instead of training when the file exists (ruleorder).
# --force: Snakemake decided the run must be (re)made, so a stale run directory there is replaced.


ruleorder: convert > train


rule convert:
    input:
        legacy=f"{LEGACY}/{{model_name}}/{{model_name}}_p{{prime}}_seed{{seed}}.pth",
    output:
        model=f"{RUN}/{{model_name}}_p{{prime}}_seed{{seed}}.safetensors",
        config=f"{RUN}/config.json",
        metadata=f"{RUN}/metadata.json",
    log:
        "logs/{model_name}/convert/{model_name}_p{prime}_seed{seed}.log",
    wildcard_constraints:
        model_name=legacy_pattern("model_name"),
        prime=legacy_pattern("prime"),
        seed=legacy_pattern("seed"),
    conda:
        CONDA_ENV
    threads: 1
    params:
        run_dir=run_dir,
        grokking_threshold=config["grokking_threshold"],
    shell:
        "grokpipe convert {input.legacy:q} {params.run_dir:q}"
        " --grokking-threshold {params.grokking_threshold} --force 2> {log:q}"
