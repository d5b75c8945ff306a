"""The recipe that trains the bundled demo model from random weights on the CPU (scripts/train_demo_model.py)
and the PIIP experiment's variants (scripts/piip_experiment.py).

It is not part of the installed package: it uses the library only through its public API (the synthetic
dataset, `piip_llava.training`'s sample-building steps, `piip-llava train` and `piip-llava eval`).

- `pretraining`: stage 0, standing in for the pretrained backbones and LLM a real PIIP-LLaVA starts from;
- `pipeline`: the whole recipe (`Recipe`): data and tokenizer, stage 0, stages 1 and 2, evaluation;
- `precision`: the float32 attention kernel its stage-0 LLM uses under bf16 autocast.

The scripts in scripts/ import it as `demo_recipe` (their folder is first on the import path); the tests
find it through pytest's `pythonpath` setting.
"""
