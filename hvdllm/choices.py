"""The names a config can choose among, each list in one place.

They live here rather than next to their implementations because those import torch, and
``hvdllm.config`` validates names without it (a config mistake or ``--print-config`` answers
before torch would have loaded). The implementing code reads the same tuples, and the unit
tests build every name, so a name cannot be listed without being implemented.
"""

OPTIMIZERS = ("adamw", "lamb", "adafactor")  # hvdllm.optim.build.build_optimizer
SCHEDULES = ("cosine", "step", "linear", "wsd", "constant")  # hvdllm.optim.schedule.lr_factor
SCALE_RULES = ("none", "linear", "sqrt")  # hvdllm.optim.schedule.scaled_lr
POSITIONS = ("learned", "rope")  # hvdllm.model.gpt: learned table or rotary embeddings
INIT_STRATEGIES = ("gpt2", "xavier", "kaiming", "small")  # hvdllm.model.init.init_weights

# hvdllm/parallel/partition.py: what a pipeline cut balances across stages.
BALANCE_COSTS = ("params", "flops", "memory")
# hvdllm/parallel/schedules.py: pipeline schedules.
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
# hvdllm/parallel/__init__.py: how updates travel (sync.py, param_server.py, local_sgd.py).
PARALLEL_STRATEGIES = ("sync", "async", "local-sgd")
# hvdllm/tune/space.py: the tables of a [tune.space] entry ({ log = [lo, hi] }, ...); `step` may join them.
SPACE_DISTRIBUTIONS = ("log", "uniform", "int")
