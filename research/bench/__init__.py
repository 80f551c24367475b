"""Benchmarks: cost ratios measured side by side in one run (`python -m research.bench.<name>`).

method    the library's shortcuts (Stage I prefix reuse, physical pruning)
training  the training shortcuts (Stage II shared prefix, eq. 9's passes, DeepSpeed steps)
gpu       Stage II/III steps and sampling of a real-sized Wan on GPUs
e2e       one video end to end (text, transformer, full VAE and tiny decoder), teacher against student
nodes     the ComfyUI sampler node against the stock one, and a pruned model's memory in ComfyUI
shards    the bytes the shard loader reads per byte of the rows it draws
fp8       the student exported as fp8_scaled against bf16: file size and output difference on the toy
"""
