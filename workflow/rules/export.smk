# Exports of verified runs (config key `export`): models/{architecture}-{size}-{dataset}-{type}-{version}/.
# The export's name depends on the run's results (its grokking epoch), so the rule's output is a small
# record in the run naming the export directory. --force: Snakemake decided the export must be remade.


rule export:
    input:
        unpack(trained_inputs),
        verify=f"{RUN}/verify.json",
    output:
        f"{RUN}/exports/{{which}}.json",
    log:
        "logs/{model_name}/export/{model_name}_p{prime}_seed{seed}.{which}.log",
    wildcard_constraints:
        which="grokked|final",
    conda:
        CONDA_ENV
    threads: 1
    params:
        run_dir=run_dir,
        models_dir=config["models_dir"],
    shell:
        "grokpipe export {params.run_dir:q} --{wildcards.which} --out {params.models_dir:q}"
        " --force --skip-ungrokked --record {output:q} > {log:q} 2>&1"
