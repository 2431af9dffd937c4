# Sourced by the sbatch templates: run a Slurm step, turn the time-limit signal into a checkpoint, requeue.
#
#   run_step srun ... python launch/pretrain.py ... --resume auto
#
# Slurm sends the batch shell (#SBATCH --signal=B:USR1@SECONDS) USR1 before the time limit; the trap passes
# SIGTERM to srun, which forwards it to its tasks (torchrun agents, or the training processes themselves); every
# rank saves a checkpoint at the step it is in and exits. Then, unless the run wrote its final checkpoint, the
# job is requeued (scontrol requeue keeps the job id, so RUN_NAME and the folder stay) and the next start resumes
# with --resume auto. A failed step is requeued at most MAX_RESTARTS times in a row without a new checkpoint: the
# count ($CHECKPOINT_DIR/.slurm_failures: the latest checkpoint's name and the failures since it) starts again once
# the run has saved past the last failure, so a run of weeks survives a node failure every few days, and one that
# fails again and again at the same step stops. (SLURM_RESTART_COUNT counts every requeue, the time-limit ones
# too: three days of a 24-hour job had used up the budget, and the next node failure ended the run.) A run that
# stopped itself at --max-time (its latest checkpoint's COMPLETE.json says "stopped_for": "time_limit") is
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
    if [ "$status" = 0 ] && [ -n "$latest" ] && grep -Eq '"stopped_for"[[:space:]]*:[[:space:]]*"time_limit"' "$CHECKPOINT_DIR/$latest/COMPLETE.json" 2>/dev/null; then
        echo "scaletrain-slurm: the run stopped at --max-time ($CHECKPOINT_DIR/$latest); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    if [ "$signalled" = 1 ]; then
        echo "scaletrain-slurm: step ended with status $status before the end of the run; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    if [ "$status" = 0 ]; then  # it stopped on purpose (--stop-at-step, --epoch-limit stop): not a requeue
        echo "scaletrain-slurm: step stopped before the end of the run without a signal; not requeued"
        return 0
    fi
    # the failures in a row since the latest checkpoint (none: since the start), kept across requeues in the folder
    local since="${latest:-none}" failures=1 record="$CHECKPOINT_DIR/.slurm_failures" before="" count=""
    [ -f "$record" ] && read -r before count < "$record"
    if [ "$before" = "$since" ] && [[ "$count" =~ ^[0-9]+$ ]]; then
        failures=$((count + 1))
    fi
    if ! { mkdir -p "$CHECKPOINT_DIR" && echo "$since $failures" > "$record.tmp" && mv -f "$record.tmp" "$record"; }; then
        failures=$((${SLURM_RESTART_COUNT:-0} + 1))  # no count can be kept: every requeue of this job counts
        echo "scaletrain-slurm: could not write $record; counting this job's requeues instead ($failures)"
    fi
    if [ "$failures" -le "${MAX_RESTARTS:-3}" ]; then
        echo "scaletrain-slurm: step failed with status $status (failure $failures of ${MAX_RESTARTS:-3} since checkpoint $since); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    echo "scaletrain-slurm: step failed with status $status ($failures failures in a row since checkpoint $since, MAX_RESTARTS ${MAX_RESTARTS:-3}); not requeued"
    return "$status"
}
