#!/usr/bin/env bash
# The whole-slide measurements of docs/BENCHMARKS.md ("Real slides, fast"), one after the other in one
# run: a 20,480 px slide 30 % covered (with and without shared crops, and at a coarser rough scale), a 10,240 px bright-field slide,
# a dense 24,576 px slide (fields touching), each against its fields one by one, and the dense slide's
# centre against a full-resolution sliding window. Slides are made first if missing (same seeds, same
# slides). Every process runs on one thread (torch and chunk threads), so that on a shared, loaded CPU
# each side gets the same share and the ratios measure work, not who waited for whom (THREADS=0 for the
# defaults). Results: runs/bench/side/*.json; copy them to benchmarks/results/ to cite them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-../shared/data/dsb2018}
S=runs/slides
OUT=runs/bench/side
THREADS=${THREADS:-1}
T=(--threads "$THREADS" --chunk-threads "${THREADS/#0/2}")
mkdir -p "$S" "$OUT"
make() { [ -f "$S/$1.ome.tif" ] || $PY benchmarks/make_slide.py --data "$DATA" --out "$S/$1.ome.tif" "${@:2}"; }
make s20k --size 20480
make bf10k --size 10240 --stain brightfield
make dense24k --size 24576 --tissue full --gap 0 --coverage 0.95
uptime | tee "$OUT/load.txt"
$PY benchmarks/bench_slide.py --slide $S/s20k.ome.tif --data "$DATA" "${T[@]}" --json $OUT/slide_20k.json
$PY benchmarks/bench_slide.py --slide $S/s20k.ome.tif --data "$DATA" "${T[@]}" --skip-fields \
    --predict-args "--group-zoom 0" --json $OUT/slide_20k_one_crop_per_box.json
$PY benchmarks/bench_slide.py --slide $S/s20k.ome.tif --data "$DATA" "${T[@]}" --skip-fields \
    --predict-args "--rough-scale 8" --json $OUT/slide_20k_rough_scale_8.json
$PY benchmarks/bench_slide.py --slide $S/bf10k.ome.tif --data "$DATA" "${T[@]}" --json $OUT/slide_bf10k.json
$PY benchmarks/bench_slide.py --slide $S/dense24k.ome.tif --data "$DATA" "${T[@]}" --json $OUT/slide_dense24k.json
$PY benchmarks/bench_dense.py --slide $S/dense24k.ome.tif --region 10240 10240 4096 --zooms 1.0 \
    --threads "$THREADS" --json $OUT/dense24k_centre_sliding_window.json
uptime | tee -a "$OUT/load.txt"
