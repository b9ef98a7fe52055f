# LoRA fine-tunes of chosen runs' grokked checkpoints (config section finetune:), their merges and the
# table comparing them with the same tasks trained from scratch (results/_finetune/{model_name}/).
# The adapter's directory name depends on the base export's, so each rule's output is a small record
# in the base run naming the directory it wrote (or that the base never grokked).


rule finetune:
    input:
        unpack(trained_inputs),
        verify=f"{RUN}/verify.json",
    output:
        f"{RUN}/finetunes/{{operation}}-r{{rank}}-f{{ftseed}}.json",
    log:
        "logs/{model_name}/finetune/{model_name}_p{prime}_seed{seed}.{operation}-r{rank}-f{ftseed}.log",
    benchmark:
        "benchmarks/{model_name}/finetune/{model_name}_p{prime}_seed{seed}.{operation}-r{rank}-f{ftseed}.tsv"
    wildcard_constraints:
        operation=r"[a-z_]+",
        rank=r"\d+",
        ftseed=r"\d+",
    conda:
        CONDA_ENV
    threads: 1
    params:
        run_dir=run_dir,
        models_dir=config["models_dir"],
        options=finetune_options(),
    shell:
        "grokpipe finetune {params.run_dir:q} --grokked --operation {wildcards.operation}"
        " --rank {wildcards.rank} --seed {wildcards.ftseed} {params.options} --out {params.models_dir:q}"
        " --threads {threads} --skip-ungrokked --no-progress --record {output:q} 2> {log:q}"


rule merge:
    input:
        f"{RUN}/finetunes/{{operation}}-r{{rank}}-f{{ftseed}}.json",
    output:
        f"{RUN}/finetunes/{{operation}}-r{{rank}}-f{{ftseed}}.merged.json",
    log:
        "logs/{model_name}/merge/{model_name}_p{prime}_seed{seed}.{operation}-r{rank}-f{ftseed}.log",
    wildcard_constraints:
        operation=r"[a-z_]+",
        rank=r"\d+",
        ftseed=r"\d+",
    conda:
        CONDA_ENV
    threads: 1
    shell:
        "grokpipe merge {input:q} --record {output:q} 2> {log:q}"


rule transfer_report:
    input:
        transfer_inputs,
    output:
        table=f"{RESULTS}/_finetune/{{model_name}}/transfer.csv",
        markdown=f"{RESULTS}/_finetune/{{model_name}}/transfer.md",
    log:
        "logs/_finetune/{model_name}.log",
    conda:
        CONDA_ENV
    threads: 1
    params:
        config=sweep_config_json,
        out_dir=lambda wildcards: f"{RESULTS}/_finetune/{wildcards.model_name}",
    shell:
        "grokpipe transfer-report --config-json {params.config:q} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"
