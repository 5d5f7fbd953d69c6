# Sourced by the launch scripts: wait for the job's launcher and exit with the run's status.
#
# wait_and_report LAUNCHER_PID STARTED ARGS...: ARGS are the job's `hvdllm train` arguments
# (--config and overrides), from which `hvdllm report` finds the run folder. The exit status
# is the run's: 0 finished or preempted, 1 failed or ended without a word (status.json).
wait_and_report() {
  local launcher=$1 started=$2
  shift 2
  # wait returns early when a trapped signal arrives; wait again until the launcher is gone.
  wait "$launcher" || true
  while kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher" || true
  done
  hvdllm report --job-ended --since "$started" "$@"
}
