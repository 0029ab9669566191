#!/bin/bash
# The GPU runs of benchmarks/README.md on one host with two H200s: each process alone on its GPU.
#   bash benchmarks/run_h200x2.sh anchors NAME   the 135M and 1B rows against every anchor, one shape per GPU, at once
#   bash benchmarks/run_h200x2.sh scaling        bench_distributed.py: 1B on 1 and 2 GPUs, minipeft and HF + accelerate (HF=0: not HF)
#   bash benchmarks/run_h200x2.sh 7b             FSDP2 per-GPU memory at 7B (full, QLoRA); HF + accelerate FSDP2 at 1B
#   bash benchmarks/run_h200x2.sh link           the GPUs' topology and NCCL all-reduce bandwidth (allreduce.py)
#   bash benchmarks/run_h200x2.sh cli            `minipeft finetune --method qlora --fsdp` on 2 GPUs against 1 GPU
#   bash benchmarks/run_h200x2.sh mem NAME       GPU 0: QLoRA at 7B (1x512, 1x4096) vs Unsloth; GPU 1: 135M and 1B rows
#   bash benchmarks/run_h200x2.sh recheck NAME   GPU 0: 135M, HF graphs vs minipeft graphs, profiled; 1B LoRA all memory,
#                                                profiled; the 4-bit op's host time. GPU 1: 1B, HF graphs vs minipeft
#                                                graphs; QLoRA at 7B 1x4096 vs Unsloth + ckpt
#   bash benchmarks/run_h200x2.sh order NAME     GPU 0: 135M full and QLoRA, HF graphs and minipeft graphs in both orders,
#                                                40 steps; GPU 1: QLoRA at 7B 1x4096 vs Unsloth + ckpt, the 4-bit op's host time
#   bash benchmarks/run_h200x2.sh rounds NAME    HF graphs vs minipeft graphs, every method: 135M on GPU 0 (3 rounds, 30
#                                                steps), 1B on GPU 1 (2 rounds); each process pinned to 8 cores of its own
#   bash benchmarks/run_h200x2.sh mlp NAME       the CUDA tests of tests/test_fast.py, then the LoRA and QLoRA rows' memory
#                                                contenders: 1B on GPU 0, 135M on GPU 1 (fast_mlp's hand-written backward)
#   bash benchmarks/run_h200x2.sh fsdpcheck      the 4-bit bytes under FSDP2 (fsdp_nf4_check.py); step-0 held-out loss of
#                                                LoRA and QLoRA: one process, DDP, FSDP2 (minipeft finetune, bundled model)
#   bash benchmarks/run_h200x2.sh profile        1B LoRA all (DDP) and full (FSDP2) on 1 and 2 GPUs, profiled
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
  [ "${HF:-1}" = 0 ] && exit  # HF=0: minipeft's rows alone
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
link)
  nvidia-smi topo -m > "$out/topo.txt" 2>&1
  NCCL_DEBUG=INFO $T benchmarks/allreduce.py --out "$out/allreduce.jsonl" > "$out/allreduce.log" 2>&1 ;;
cli)  # the bundled model and text, 5 steps: sharded (rank 0 builds on its CPU, rank 1 on meta) and one GPU
  F="python -m minipeft.cli finetune --method qlora --device cuda --steps 5 --eval-every 5 --no-samples"
  $F --nproc 2 --fsdp --out /tmp/cli-fsdp > "$out/cli-fsdp.log" 2>&1; echo "fsdp exit $?" >> "$out/cli-fsdp.log"
  $F --out /tmp/cli-one > "$out/cli-one.log" 2>&1; echo "one exit $?" >> "$out/cli-one.log" ;;
mem)  # the memory contenders: MEM (default below), every method at 135M and 1B, QLoRA at 7B
  A=${MEM:-unsloth_gc,minipeft_offload,minipeft_lowmem}
  CUDA_VISIBLE_DEVICES=0 $B --steps 4 --warmup 2 --shapes llama-7b,llama-7b-4k --methods qlora --contenders $A \
    --switches none --out "$out" --name "$2-7b" > "$out/$2-7b.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 $B --shapes smollm2-135m,llama-1b --methods $METHODS --contenders $A --switches none \
    --out "$out" --name "$2" > "$out/$2.log" 2>&1 &
  wait ;;
recheck)
  G="--contenders hf_graphs,minipeft_graphs --switches none --methods $METHODS"
  ( CUDA_VISIBLE_DEVICES=0 $B --shapes smollm2-135m $G --profile --out "$out" --name "$2-135m" > "$out/$2-135m.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 $B --shapes llama-1b --methods lora_all --contenders unsloth_gc,minipeft_lowmem \
      --switches none --profile --out "$out" --name "$2-1b-mem" > "$out/$2-1b-mem.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 python benchmarks/nf4_op_host.py --out "$out/$2-op-host.json" > "$out/$2-op-host.log" 2>&1 ) &
  ( CUDA_VISIBLE_DEVICES=1 $B --shapes llama-1b $G --out "$out" --name "$2-1b" > "$out/$2-1b.log" 2>&1
    CUDA_VISIBLE_DEVICES=1 $B --steps 4 --warmup 2 --shapes llama-7b-4k --methods qlora \
      --contenders unsloth_gc,minipeft_offload,minipeft_lowmem --switches none --out "$out" --name "$2-7b" \
      > "$out/$2-7b.log" 2>&1 ) &
  wait ;;
order)
  O="--shapes smollm2-135m --methods full,qlora --switches none --steps 40"
  ( CUDA_VISIBLE_DEVICES=0 $B $O --contenders minipeft_graphs,hf_graphs --out "$out" --name "$2-mh" > "$out/$2-mh.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 $B $O --contenders hf_graphs,minipeft_graphs --out "$out" --name "$2-hm" > "$out/$2-hm.log" 2>&1 ) &
  ( CUDA_VISIBLE_DEVICES=1 $B --steps 4 --warmup 2 --shapes llama-7b-4k --methods qlora \
      --contenders unsloth_gc,minipeft_offload,minipeft_lowmem --switches none --out "$out" --name "$2-7b" \
      > "$out/$2-7b.log" 2>&1
    CUDA_VISIBLE_DEVICES=1 python benchmarks/nf4_op_host.py --out "$out/$2-op-host.json" > "$out/$2-op-host.log" 2>&1 ) &
  wait ;;
rounds)
  R="--contenders hf_graphs,minipeft_graphs --switches none --methods $METHODS"
  CUDA_VISIBLE_DEVICES=0 taskset -c 0-7 $B --shapes smollm2-135m $R --rounds 3 --steps 30 --out "$out" \
    --name "$2-135m" > "$out/$2-135m.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 taskset -c 16-23 $B --shapes llama-1b $R --rounds 2 --out "$out" --name "$2-1b" \
    > "$out/$2-1b.log" 2>&1 &
  wait ;;
mlp)
  M="--methods lora_qv,lora_all,qlora --contenders unsloth_gc,minipeft_offload,minipeft_lowmem --switches none"
  ( python -m pytest -p no:cacheprovider -n 0 -q tests/test_fast.py -k "triton or cuda" > "$out/$2-cuda-test.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 $B --shapes llama-1b $M --out "$out" --name "$2-1b" > "$out/$2-1b.log" 2>&1 ) &
  CUDA_VISIBLE_DEVICES=1 $B --shapes smollm2-135m $M --out "$out" --name "$2-135m" > "$out/$2-135m.log" 2>&1 &
  wait ;;
profile)
  P="$D --steps 8 --warmup 4 --compile default"
  CUDA_VISIBLE_DEVICES=0 python $P --method lora_all --profile "$out/prof-lora-1" > "$out/prof-lora-1.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 python $P --method full --profile "$out/prof-full-1" > "$out/prof-full-1.log" 2>&1 &
  wait
  $T $P --method lora_all --profile "$out/prof-lora-2" > "$out/prof-lora-2.log" 2>&1
  $T $P --method full --fsdp --profile "$out/prof-fsdp-2" > "$out/prof-fsdp-2.log" 2>&1 ;;
fsdpcheck)  # the 4-bit bytes under FSDP2, and the step-0 held-out loss one process / DDP / FSDP2
  $T benchmarks/fsdp_nf4_check.py 2>&1 | tee "$out/fsdp-nf4-check.log"
  a="--steps 2 --seq-len 16 --eval-every 2 --no-samples --seed 3"
  for m in lora qlora; do
    python -m minipeft.cli finetune --method $m $a --batch-size 4 --out /tmp/fc/$m-one > /dev/null 2>&1
    python -m minipeft.cli finetune --method $m $a --nproc 2 --global-batch 4 --out /tmp/fc/$m-ddp > /dev/null 2>&1
    python -m minipeft.cli finetune --method $m $a --nproc 2 --fsdp --global-batch 4 --out /tmp/fc/$m-fsdp > /dev/null 2>&1
    for k in one ddp fsdp; do
      python -c "import json; d = json.load(open('/tmp/fc/$m-$k/metrics.json')); print('$m $k', [(e['step'], round(e['val_loss'], 6)) for e in d['eval']])"
    done
  done 2>&1 | tee -a "$out/fsdp-nf4-check.log" ;;
qlora7b)  # 7B QLoRA under FSDP2 against one GPU
  j="$out/qlora7b.jsonl"
  $T $D --shape llama-7b --method qlora --fsdp --steps 8 --warmup 3 --out "$j"
  python $D --shape llama-7b --method qlora --steps 8 --warmup 3 --out "$j" ;;
esac
