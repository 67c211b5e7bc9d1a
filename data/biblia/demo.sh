#!/usr/bin/env bash
# The fine-tuning demos of the README, measured: for each seed, SFT of the base model, the SFT model's greedy
# answers to the testament question on the held-out books (before: the base model), on-policy DPO pairs from its
# own mistakes on training-book questions, DPO, the control (SFT on the chosen replies alone, equal steps), their
# scores against the SFT model's (paired), and the testament classifier; then a table of means and spreads.
#
#   python data/biblia/prepare.py --lang pt && python train.py config/train_biblia_pt.py   # the base model
#   bash data/biblia/demo.sh                       # 3 seeds -> out/demo/ (about an hour on 2 busy cores)
#   SEEDS="1 2" OUT=out/demo2 SFT_STEPS=300 bash data/biblia/demo.sh
#
# Each step that finished leaves OUT/.done-<step>: run it again after a stop and it goes on where it was.
# The step times go to OUT/times.tsv; data/biblia/demo_table.py prints the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-"1 2 3"}
OUT=${OUT:-out/demo}
BASE=${BASE:-out/biblia-pt}
SFT_STEPS=${SFT_STEPS:-150}
DATA=data/biblia
mkdir -p "$OUT"

step() {  # step NAME COMMAND...: run it unless done, time it
  local name=$1; shift
  [ -e "$OUT/.done-$name" ] && return 0
  echo "== $name: $*"
  local t0; t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed: see $OUT/$name.log"; tail -3 "$OUT/$name.log"; exit 1; }
  printf '%s\t%s\n' "$name" $(( $(date +%s) - t0 )) >> "$OUT/times.tsv"
  touch "$OUT/.done-$name"
}

[ -e $DATA/pt-chat/meta.json ] || python $DATA/make_tasks.py chat
[ -e $DATA/pt-questions/test.jsonl ] || python $DATA/make_tasks.py questions --train_per_answer 1500 --test_per_answer 1000
[ -e $DATA/pt-classify-testament-books/test.jsonl ] || python $DATA/make_tasks.py classify --task testament \
    --split books --test_per_label 1000 --out $DATA/pt-classify-testament-books
step base-score python $DATA/exact_match.py --model "$BASE" --template chatml --json "$OUT/base.json"
for s in $SEEDS; do
  step sft-$s python train.py config/sft_biblia_pt.py --init_from="$BASE" --max_iters=$SFT_STEPS --seed=$s \
      --out_dir=$OUT/sft-$s
  step sft-$s-score python $DATA/exact_match.py --model $OUT/sft-$s --before "$OUT/base.json" --json $OUT/sft-$s.json
  step pref-$s python $DATA/make_tasks.py pref --from_model $OUT/sft-$s --out $OUT/pref-$s --seed $s
  step chosen-$s python $DATA/make_tasks.py chosen --pairs $OUT/pref-$s --out $OUT/chosen-$s
  step dpo-$s python dpo.py config/dpo_biblia_testament.py --init_from=$OUT/sft-$s --data_dir=$OUT/pref-$s \
      --out_dir=$OUT/dpo-$s --seed=$s
  step control-$s python train.py config/control_biblia_testament.py --init_from=$OUT/sft-$s \
      --data_dir=$OUT/chosen-$s --out_dir=$OUT/control-$s --seed=$s
  step dpo-$s-score python $DATA/exact_match.py --model $OUT/dpo-$s --before $OUT/sft-$s.json --json $OUT/dpo-$s.json
  step control-$s-score python $DATA/exact_match.py --model $OUT/control-$s --before $OUT/sft-$s.json \
      --json $OUT/control-$s.json
  step classify-$s python classify.py config/classify_biblia_testament.py --init_from="$BASE" --seed=$s \
      --out_dir=$OUT/classify-$s
done
python $DATA/demo_table.py --out "$OUT"
