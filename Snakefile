# grokpipe: train the prime x seed grid of config/config.yaml, one safetensors file per checkpoint.
# Entry point only; rules live in workflow/rules/, logic in the grokpipe package (src/grokpipe/).

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/progress.smk"  # before analysis.smk, which uses its outputs
include: "workflow/rules/analysis.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/consolidate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/finetune.smk"


rule all:
    default_target: True
    input:
        final_targets(),
