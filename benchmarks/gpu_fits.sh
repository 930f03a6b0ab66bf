#!/usr/bin/env bash
# Fit the invariance models (cVAE + cINN) of the four bundled denoisers at once on one GPU,
# plus CNN-10 with the paper's objective (no consistency term, z only through the 4 x 4 map)
# for comparison; then time the sampler of the fitted models on that device.
#
#   benchmarks/gpu_fits.sh DATA OUT BUDGET      e.g. benchmarks/gpu_fits.sh devdata/sim512 runs/gpu 6m
#
# Environment: PYTHON (default python3), DEVICE (cuda), DEADLINE (seconds after which an
# unfinished fit is stopped; default 480), THREADS (CPU threads per fit; 3), NAMES (which of
# cnn10 redcnn wganvgg dugan cnn10_paper; default all), FITARGS (more fit options, e.g. for a
# quick check on the CPU), SPEED_DEADLINE (seconds for the timings; 100). Each fit logs to
# OUT/NAME.log; the sampler timings go to OUT/speed.md. Python needs the engine importable
# (PYTHONPATH=InvarianceExplorer, or the package installed).
set -u
DATA=$1 OUT=$2 BUDGET=$3
PYTHON=${PYTHON:-python3} DEVICE=${DEVICE:-cuda} DEADLINE=${DEADLINE:-480} THREADS=${THREADS:-3}
mkdir -p "$OUT"
for name in ${NAMES:-cnn10 redcnn wganvgg dugan cnn10_paper}; do
    extra="--set cvae.lam_cons=1 --set cvae.z_modulation=true"  # train_invariance: consistency term, z at every scale
    [ "$name" = cnn10_paper ] && extra=""
    OMP_NUM_THREADS=$THREADS timeout "$DEADLINE" "$PYTHON" -m InvarianceExplorerLib fit \
        --denoiser "Resources/Models/${name%_paper}" --data "$DATA" --out "$OUT/$name" --budget "$BUDGET" \
        --batch-size 32 --device "$DEVICE" --seed 1 --weights-dtype float16 --no-progress $extra ${FITARGS:-} \
        > "$OUT/$name.log" 2>&1 &
done
wait
models=()
for name in ${NAMES:-cnn10 redcnn wganvgg dugan}; do
    [ "$name" = cnn10_paper ] && continue
    if [ -f "$OUT/$name/metadata.json" ]; then models+=("$OUT/$name"); else echo "$name: no model (see $OUT/$name.log)"; fi
done
if [ ${#models[@]} -gt 0 ]; then set -- "${models[@]}"; else set -- --random cnn10 redcnn wganvgg dugan; fi
timeout "${SPEED_DEADLINE:-100}" "$PYTHON" benchmarks/invariance_speed.py "$@" --devices "$DEVICE" > "$OUT/speed.md" 2>&1
cat "$OUT/speed.md"
