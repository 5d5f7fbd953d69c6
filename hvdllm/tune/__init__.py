"""``hvdllm tune``: hyperparameter search over training runs (seed 7.1).

An Optuna study (its SQLite file in the study folder, so a re-run resumes it) samples the
``[tune.space]`` of a config; each trial is an ``hvdllm train`` job under ``mpirun``, followed
through its metrics.jsonl and stopped early when its validation loss is pruned.

- :mod:`hvdllm.tune.space`: the search space, parsed and checked before anything runs;
- :mod:`hvdllm.tune.study`: the study's storage, sampler, pruner, lock and recovery;
- :mod:`hvdllm.tune.trial`: one trial's sub-job, its metrics followed, stopped when pruned;
- :mod:`hvdllm.tune.report`: the table, CSV/JSON and plot of a study;
- :mod:`hvdllm.tune.run`: the verb, tying them together.

Only this package imports optuna, and only when the verb runs.
"""
