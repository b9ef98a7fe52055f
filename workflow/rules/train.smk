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


# Several runs of one shape in one process (config key runs_per_job): one job trains its members
# stacked and writes each one's run directory as rule train does; its record names them. A run's
# analysis waits for the record (trained_inputs), so the members' files are nobody's declared
# output: Snakemake never deletes them, and a killed job resumes every member.
rule train_job:
    output:
        f"{RESULTS}/_jobs/{{job}}.json",
    log:
        "logs/_jobs/{job}.log",
    benchmark:
        "benchmarks/_jobs/{job}.tsv"
    wildcard_constraints:
        job=r"job-[0-9a-f]{12}",
    conda:
        CONDA_ENV
    threads: train_threads()
    resources:
        **({"gpu": 1} if config["device"] == "cuda" else {}),
    params:
        specs=job_specs,
        device=config["device"],
        grokking_threshold=config["grokking_threshold"],
    shell:
        "grokpipe train --specs {params.specs:q} --device {params.device} --threads {threads}"
        " --grokking-threshold {params.grokking_threshold} --record {output:q} 2> {log:q}"
