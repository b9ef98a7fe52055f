# A sweep's table (one row per run: axis values, grokking and memorization epochs, final losses and
# accuracies, outcome) and its phase diagrams, at results/_sweeps/{model_name}/. Part of the default
# target when the config has sweep: axes. The command expands the config itself, so the shell line
# stays short however many runs the sweep has.


localrules:
    sweep_report,


rule sweep_report:
    input:
        sweep_inputs,
    output:
        table=f"{RESULTS}/_sweeps/{{sweep}}/sweep.csv",
        grokking=report(
            f"{RESULTS}/_sweeps/{{sweep}}/grokking_epoch.png",
            caption="../report/sweep.rst",
            category="Sweep",
            labels={"sweep": "{sweep}", "figure": "median grokking epoch"},
        ),
        outcome=report(
            f"{RESULTS}/_sweeps/{{sweep}}/outcome.png",
            caption="../report/sweep.rst",
            category="Sweep",
            labels={"sweep": "{sweep}", "figure": "outcome per cell"},
        ),
        against_axis=report(
            f"{RESULTS}/_sweeps/{{sweep}}/grokking_vs_axis.png",
            caption="../report/sweep.rst",
            category="Sweep",
            labels={"sweep": "{sweep}", "figure": "grokking epoch against an axis"},
        ),
    log:
        "logs/_sweeps/{sweep}.log",
    conda:
        CONDA_ENV
    threads: 1
    params:
        config=sweep_config_json,
        out_dir=lambda wildcards: f"{RESULTS}/_sweeps/{wildcards.sweep}",
    shell:
        "grokpipe sweep-report --config-json {params.config:q} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"
