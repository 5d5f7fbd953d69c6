"""The old import path of :func:`hvdllm.train.phases.plan_phases`, kept for
hvdllm/parallel/server_loop.py until it imports that (a "stage" is a pipeline stage elsewhere)."""

from hvdllm.train.phases import plan_phases as plan_stages

__all__ = ["plan_stages"]
