# A checkpoint of another trainer placed at imports/{name}/ (HF sharded safetensors or .bin, DCP/FSDP,
# DeepSpeed ZeRO) becomes consolidated/{name}/model.safetensors; a run directory holding
# checkpoint-N/global_stepN directories becomes consolidated/{name}/{name}_step_{N}/ for each.
# --force: Snakemake decided the output must be (re)made, so a stale one there is replaced.


rule consolidate:
    input:
        f"{IMPORTS}/{{name}}",
    output:
        directory(f"{CONSOLIDATED}/{{name}}"),
    log:
        "logs/consolidate/{name}.log",
    conda:
        CONDA_ENV
    threads: 2  # the copy, and the sha256 of the sources beside it
    params:
        mode=consolidate_mode,
        dtype=consolidate_dtype_flag(),
    shell:
        "grokpipe consolidate {input:q} {output:q} {params.mode} {params.dtype}"
        " --force --no-progress > {log:q} 2>&1"
