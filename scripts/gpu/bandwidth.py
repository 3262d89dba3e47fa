"""The machine's two ceilings: device-to-device copy bandwidth (bytes read + written per
second on a 4 GiB buffer) and bf16 matmul throughput (8192^3). usage: bandwidth.py OUT_JSON"""
import json, sys, time

import torch


def timed(f, n):
    f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


a = torch.empty(1 << 31, dtype=torch.int16, device="cuda")  # 4 GiB
b = torch.empty_like(a)
s = timed(lambda: b.copy_(a), 20)
copy_bw = 2 * a.numel() * 2 / s
del a, b
n = 8192
x = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
y = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
s2 = timed(lambda: x @ y, 20)
r = {"gpu": torch.cuda.get_device_name(), "copy_bytes_per_s": copy_bw, "copy_gb_s": copy_bw / 1e9,
     "bf16_matmul_tflops": 2 * n ** 3 / s2 / 1e12}
json.dump(r, open(sys.argv[1], "w"), indent=1)
print(json.dumps(r))
