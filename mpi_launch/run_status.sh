# Sourced by the launch scripts: wait for the job's launcher and exit with the run's status.
#
# wait_and_report LAUNCHER_PID STARTED ARGS...: ARGS are the job's `hvdllm train` arguments
# (--config and overrides), from which `hvdllm report` finds the run folder. Meanwhile a
# watcher ends the launcher if it outlives the run's end (under mpirun --enable-recovery a
# stopped rank the job went on without holds it for ever). The exit status is the run's:
# 0 finished or preempted cleanly, 1 failed or ended without a word (status.json).
# HVDLLM_END_GRACE_S (default 60): how long the launcher may outlive the run's end.
wait_and_report() {
  local launcher=$1 started=$2
  shift 2
  hvdllm report --end-left-running "$launcher" --grace-s "${HVDLLM_END_GRACE_S:-60}" --since "$started" "$@" &
  local watcher=$!
  # wait returns early when a trapped signal arrives; wait again until the launcher is gone.
  wait "$launcher" || true
  while kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher" || true
  done
  kill "$watcher" 2>/dev/null || true
  wait "$watcher" 2>/dev/null || true
  hvdllm report --job-ended --since "$started" "$@"
}
