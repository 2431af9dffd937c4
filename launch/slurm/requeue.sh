# Sourced by the sbatch templates: run a Slurm step, turn the time-limit signal into a checkpoint, requeue.
#
#   run_step srun ... python launch/pretrain.py ... --resume auto
#
# Slurm sends the batch shell (#SBATCH --signal=B:USR1@SECONDS) USR1 before the time limit; the trap passes
# SIGTERM to srun, which forwards it to its tasks (torchrun agents, or the training processes themselves); every
# rank saves a checkpoint at the step it is in and exits. Then, unless the run wrote its final checkpoint, the
# job is requeued (scontrol requeue keeps the job id, so RUN_NAME and the folder stay) and the next start resumes
# with --resume auto. A failed step is requeued at most MAX_RESTARTS times (SLURM_RESTART_COUNT counts them). A run
# that stopped itself at --max-time (its latest checkpoint's COMPLETE.json says "stopped_for": "time_limit") is
# requeued too; one stopped on purpose (--stop-at-step, --epoch-limit stop) is not.

run_step() {
    local signalled=0 status
    "$@" &
    local step=$!
    trap 'signalled=1; echo "scaletrain-slurm: $(date +%T) got the time-limit signal; the step saves and exits"; kill -TERM "$step" 2>/dev/null' USR1 TERM
    while :; do
        wait "$step"
        status=$?
        kill -0 "$step" 2>/dev/null || break  # wait returned because of the trap: the step is still saving
    done
    trap - USR1 TERM
    if [ -f "$CHECKPOINT_DIR/final/COMPLETE.json" ]; then
        echo "scaletrain-slurm: run $RUN_NAME is complete: $CHECKPOINT_DIR/final"
        return 0
    fi
    local latest=""
    [ -f "$CHECKPOINT_DIR/latest" ] && latest=$(head -n 1 "$CHECKPOINT_DIR/latest")
    if [ "$status" = 0 ] && [ -n "$latest" ] && grep -q '"stopped_for": "time_limit"' "$CHECKPOINT_DIR/$latest/COMPLETE.json" 2>/dev/null; then
        echo "scaletrain-slurm: the run stopped at --max-time ($CHECKPOINT_DIR/$latest); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    if [ "$signalled" = 1 ] || { [ "$status" != 0 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_RESTARTS:-3}" ]; }; then
        echo "scaletrain-slurm: step ended with status $status before the end of the run; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    if [ "$status" = 0 ]; then  # it stopped on purpose (--stop-at-step, --epoch-limit stop): not a requeue
        echo "scaletrain-slurm: step stopped before the end of the run without a signal; not requeued"
        return 0
    fi
    echo "scaletrain-slurm: step failed with status $status (restart ${SLURM_RESTART_COUNT:-0} of ${MAX_RESTARTS:-3}); not requeued"
    return "$status"
}
