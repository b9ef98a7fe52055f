# Train one (prime, seed) run, then analyse it (`grokpipe analyze`: loss curves, verification, then
# the progress measures of a run that verified). One job per run: each job costs Snakemake ~3 ms of
# DAG work (a separate analysis job per run was ~20 % of a 1,000-run dry run), a cluster one
# submission, and each `grokpipe` process imports torch once. A failed verification fails the job
# (verification.json in the run keeps what was found). checkpoints/ and resume/ are deliberately not
# outputs: Snakemake deletes declared outputs before a rerun and after a failure, and those are what
# a resume needs; a job whose training is complete (an analysis output deleted, a rerun after a
# failed check) resumes after the last epoch, writes the final files again and analyses.


rule train:
    output:
        **ANALYSIS_OUTPUTS,
        **(PROGRESS_OUTPUTS if GRID_HAS_PROGRESS else {}),
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
        gpu=1 if config["device"] == "cuda" else 0,
    params:
        run_dir=run_dir,
        spec=train_spec,
        device=config["device"],
        grokking_threshold=config["grokking_threshold"],
        analysis=grid_analysis_flags(),
    shell:
        "grokpipe train {params.run_dir:q} --spec {params.spec:q} --device {params.device}"
        " --threads {threads} --grokking-threshold {params.grokking_threshold} 2> {log:q}"
        " && grokpipe analyze {params.run_dir:q} --report {output.verification:q} --threads {threads}"
        " {params.analysis} >> {log:q} 2>&1"
