# Train one (prime, seed) run. checkpoints/ and resume/ are deliberately not outputs: Snakemake
# deletes declared outputs before a rerun and after a failure, and those are what a resume needs.


rule train:
    output:
        model=f"{RUN}/{{model_name}}_p{{prime}}_seed{{seed}}.safetensors",
        config=f"{RUN}/config.json",
        metadata=f"{RUN}/metadata.json",
    log:
        "logs/{model_name}/train/{model_name}_p{prime}_seed{seed}.log",
    benchmark:
        "benchmarks/{model_name}/train/{model_name}_p{prime}_seed{seed}.tsv"
    conda:
        CONDA_ENV
    threads: train_threads()
    resources:
        # only on a GPU: each declared resource is evaluated for every job, even at 0
        **({"gpu": 1} if config["device"] == "cuda" else {}),
    params:
        run_dir=run_dir,
        spec=train_spec,
        device=config["device"],
        grokking_threshold=config["grokking_threshold"],
    shell:
        "grokpipe train {params.run_dir:q} --spec {params.spec:q} --device {params.device}"
        " --threads {threads} --grokking-threshold {params.grokking_threshold} 2> {log:q}"
