#!/bin/bash
# The GPU runs of benchmarks/README.md on one host with two H200s: each process alone on its GPU.
#   bash benchmarks/run_h200x2.sh anchors NAME   the 135M and 1B rows against every anchor, one shape per GPU, at once
#   bash benchmarks/run_h200x2.sh scaling        bench_distributed.py: 1B on 1 and 2 GPUs, minipeft and HF + accelerate
#   bash benchmarks/run_h200x2.sh 7b             FSDP2 per-GPU memory at 7B (full, QLoRA); HF + accelerate FSDP2 at 1B
# Results and logs go to $OUT (the lent machine's output folder) or /tmp/out.
set -u
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
B="python benchmarks/bench_finetune.py --device cuda --extras none --steps 12 --warmup 3"
D="benchmarks/bench_distributed.py --steps 15 --warmup 5"
T="torchrun --nproc_per_node 2"
ANCHORS=${ANCHORS:-minipeft,hf,hf_bnb,hf_compile,hf_graphs,hf_liger,unsloth,unsloth_gc}
SWITCHES=${SWITCHES:-compile,compile_cg}; METHODS=${METHODS:-full,lora_qv,lora_all,qlora}
case $1 in
anchors)
  for s in smollm2-135m:0 llama-1b:1; do
    CUDA_VISIBLE_DEVICES=${s#*:} $B --shapes ${s%:*} --methods $METHODS --contenders $ANCHORS \
      --switches $SWITCHES --out "$out" --name "$2-${s%:*}" > "$out/$2-${s%:*}.log" 2>&1 &
  done
  wait ;;
scaling)
  j="$out/scaling.jsonl"
  CUDA_VISIBLE_DEVICES=0 python $D --method lora_all --compile default --out "$j" &
  CUDA_VISIBLE_DEVICES=1 python $D --method full --compile default --out "$j" &
  wait
  $T $D --method lora_all --compile default --out "$j"
  $T $D --method full --fsdp --compile default --out "$j"
  $T $D --method full --compile default --out "$j"
  CUDA_VISIBLE_DEVICES=0 python $D --impl hf --method lora_all --out "$j" &
  CUDA_VISIBLE_DEVICES=1 python $D --impl hf --method full --out "$j" &
  wait
  $T $D --impl hf --method lora_all --out "$j"
  $T $D --impl hf --method full --fsdp --out "$j" ;;
7b)  # issue 18's sharded rows: FSDP2 per-GPU peak at 7B (full, QLoRA) against one GPU; HF + accelerate FSDP2 at 1B
  j="$out/7b.jsonl"
  $T $D --shape llama-7b --method full --fsdp --compile default --steps 8 --warmup 3 --out "$j"
  $T $D --shape llama-7b --method qlora --fsdp --steps 8 --warmup 3 --out "$j"
  CUDA_VISIBLE_DEVICES=0 python $D --shape llama-7b --method qlora --steps 8 --warmup 3 --out "$j" &
  CUDA_VISIBLE_DEVICES=1 python $D --shape llama-7b --method full --compile default --steps 8 --warmup 3 --out "$j" &
  wait
  $T $D --impl hf --method full --fsdp --out "$j" ;;
qlora7b)  # 7B QLoRA under FSDP2 against one GPU
  j="$out/qlora7b.jsonl"
  $T $D --shape llama-7b --method qlora --fsdp --steps 8 --warmup 3 --out "$j"
  python $D --shape llama-7b --method qlora --steps 8 --warmup 3 --out "$j" ;;
esac
