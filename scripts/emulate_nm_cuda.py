"""Python transliterations of the N:M CUDA kernels' index logic (csrc/cuda/nm/nm_cuda.cu), checked
against the dense reference on CPU. Not the kernels themselves: a reading aid and a cheap check of
tiling / decoding / bounds logic on machines without a GPU. Keep in step with nm_cuda.cu.
    PYTHONPATH=. python scripts/emulate_nm_cuda.py
"""
import torch

import sparse_ext  # noqa: F401  registers the ops (the CPU reference for random metadata)
from sparse_ext.formats import NMWeight


def read_index(row, j, bits):
    bit = j * bits; byte = bit >> 3; shift = bit & 7
    v = int(row[byte]) >> shift
    if shift + bits > 8: v |= int(row[byte + 1]) << (8 - shift)
    return v & ((1 << bits) - 1)

def chunk_slots(n, m):
    for vec in (8, 4, 2):
        if vec * m <= 16 * n:
            return vec
    return 1

def warp_kernel(vals, meta, x, n, m, K, TT):
    R, kept = vals.shape; T = x.shape[0]; bits = {4: 2, 8: 3, 16: 4}[m]; mask = (1 << bits) - 1
    VEC = chunk_slots(n, m)
    y = torch.zeros(T, R, dtype=torch.float64)
    for r in range(R):
        for t0 in range(0, T, TT):
            nt = min(TT, T - t0)
            acc = [[0.0] * TT for _ in range(32)]
            for lane in range(32):
                kStride = 32 * VEC; step_g = kStride // n; step_q = kStride - step_g * n
                g_first = lane * VEC // n; q_first = lane * VEC - g_first * n
                whole_bytes = (VEC * bits) % 8 == 0; chunk_bytes = VEC * bits // 8
                c = lane
                while c * VEC < kept:
                    j0 = c * VEC
                    if j0 + VEC <= kept:
                        v = [float(vals[r, j0 + i]) for i in range(VEC)]
                        if whole_bytes:
                            word = 0
                            for q in range(chunk_bytes): word |= int(meta[r, c * chunk_bytes + q]) << (8 * q)
                            idx = [(word >> (i * bits)) & mask for i in range(VEC)]
                        else:
                            idx = [read_index(meta[r], j0 + i, bits) for i in range(VEC)]
                        count = VEC
                    else:
                        count = kept - j0
                        v = [float(vals[r, j0 + i]) if i < count else 0.0 for i in range(VEC)]
                        idx = [read_index(meta[r], j0 + i, bits) if i < count else 0 for i in range(VEC)]
                    g, q = g_first, q_first
                    g_first += step_g; q_first += step_q
                    if q_first >= n: q_first -= n; g_first += 1
                    for i in range(VEC):
                        col = g * m + idx[i]
                        if i < count and col < K:
                            for t in range(nt): acc[lane][t] += v[i] * float(x[t0 + t, col])
                        q += 1
                        if q == n: q = 0; g += 1
                    c += 32
            for t in range(nt): y[t0 + t, r] = sum(acc[l][t] for l in range(32))
    return y

def tiled_kernel(vals, meta, x, n, m, K):
    R, kept = vals.shape; T = x.shape[0]; bits = {4: 2, 8: 3, 16: 4}[m]
    G = -(-K // m); y = torch.zeros(T, R, dtype=torch.float64)
    KC, BT, BR, XS, MS = 32, 128, 64, 132, 30
    for r0 in range(0, R, BR):
        for t0 in range(0, T, BT):
            acc = torch.zeros(256, 4, 8, dtype=torch.float64)
            gpc = KC // m
            for g0 in range(0, G, gpc):
                k0 = g0 * m; cg = min(G - g0, gpc); slots = cg * n
                assert slots <= MS
                xs = [0.0] * (KC * XS)
                for e in range(KC * BT):
                    t, c = e // KC, e % KC
                    tok, col = t0 + t, k0 + c
                    xs[c * XS + t] = float(x[tok, col]) if tok < T and col < K else 0.0
                ws = [(0.0, 0)] * (BR * MS)
                for e in range(BR * slots):
                    row, q = e // slots, e % slots
                    rr, j = r0 + row, g0 * n + q
                    v, col = 0.0, 0
                    if rr < R:
                        v = float(vals[rr, j]); col = (q // n) * m + read_index(meta[rr], j, bits)
                    assert col < KC
                    ws[row * MS + q] = (v, col * XS)
                for tid in range(256):
                    tx, ty = tid % 16, tid // 16
                    for q in range(slots):
                        for i in range(4):
                            v, off = ws[(ty * 4 + i) * MS + q]
                            a = xs[off + tx * 4: off + tx * 4 + 4]
                            b = xs[off + 64 + tx * 4: off + 64 + tx * 4 + 4]
                            for t in range(4): acc[tid, i, t] += v * a[t]
                            for t in range(4): acc[tid, i, 4 + t] += v * b[t]
            for tid in range(256):
                tx, ty = tid % 16, tid // 16
                for i in range(4):
                    rr = r0 + ty * 4 + i
                    if rr >= R: continue
                    for t in range(8):
                        tok = t0 + (tx * 4 + t if t < 4 else 64 + tx * 4 + (t - 4))
                        if tok < T: y[tok, rr] = acc[tid, i, t]
    return y

def mma_kernel(vals, meta, x, n, m, K, splits=1):
    R, kept = vals.shape; T = x.shape[0]; bits = {4: 2, 8: 3, 16: 4}[m]; G = -(-K // m)
    BT, BR, KC, LD = 64, 64, 32, 40
    y = torch.zeros(T, R, dtype=torch.float64)
    for bx in range(-(-R // BR)):
        r0 = bx * BR
        for t0 in range(0, T, BT):
          gpc = KC // m
          chunks = -(-G // gpc); cps = -(-max(chunks, 1) // splits)
          total = torch.zeros(BT, BR, dtype=torch.float64)
          for z in range(splits):  # split-K slices, partial sums added in split order
            acc = torch.zeros(BT, BR, dtype=torch.float64)
            g_begin = z * cps * gpc; g_end = min(G, g_begin + cps * gpc)
            for g0 in range(g_begin, g_end, gpc):
                k0 = g0 * m; cg = min(g_end - g0, gpc)
                xs = torch.zeros(BT, LD, dtype=torch.float64)
                for e in range(BT * (KC // 8)):
                    t, c8 = e // (KC // 8), (e % (KC // 8)) * 8
                    tok, col = t0 + t, k0 + c8
                    for i in range(8):
                        xs[t, c8 + i] = float(x[tok, col + i]) if tok < T and col + i < K else 0.0
                ws = torch.zeros(BR, LD, dtype=torch.float64)
                for e in range(BR * cg):
                    row, gl = e // cg, e % cg
                    r = r0 + row
                    if r >= R: continue
                    g = g0 + gl
                    for q in range(n):
                        j = g * n + q
                        c = gl * m + read_index(meta[r], j, bits)
                        assert c < KC
                        if k0 + c >= K: continue
                        ws[row, c] += float(vals[r, j])
                for warp in range(4):
                    wt, wr = warp // 2, warp % 2
                    for kk in (0, 16):
                        for i in range(2):
                            a = xs[wt * 32 + i * 16: wt * 32 + i * 16 + 16, kk:kk + 16]
                            for jj in range(2):
                                # B col-major at ws + (wr*32+jj*16)*LD + kk: B(k, nn) = ws[row0+nn, kk+k]
                                b = ws[wr * 32 + jj * 16: wr * 32 + jj * 16 + 16, kk:kk + 16].t()
                                acc[wt * 32 + i * 16: wt * 32 + i * 16 + 16,
                                    wr * 32 + jj * 16: wr * 32 + jj * 16 + 16] += a @ b
            total += acc
          for t in range(BT):
                for row in range(BR):
                    if t0 + t < T and r0 + row < R: y[t0 + t, r0 + row] = total[t, row]
    return y

def grad_input_kernel(vals, meta, dy, n, m, K):
    R, kept = vals.shape; T = dy.shape[0]; bits = {4: 2, 8: 3, 16: 4}[m]
    dx = torch.zeros(T, K, dtype=torch.float64); TT = 4
    for bx in range(-(-K // 32)):
        for t0 in range(0, T, TT):
            nt = min(TT, T - t0)
            part = torch.zeros(8, TT, 32, dtype=torch.float64)
            for warp in range(8):
                for lane in range(32):
                    c = bx * 32 + lane
                    if c >= K: continue
                    g = c // m; want = c - g * m
                    rpw = -(-R // 8); rb = warp * rpw; re = min(R, rb + rpw)
                    for r in range(rb, re):
                        for q in range(n):
                            if read_index(meta[r], g * n + q, bits) != want: continue
                            for t in range(nt): part[warp, t, lane] += float(vals[r, g * n + q]) * float(dy[t0 + t, r])
            for lane in range(32):
                c = bx * 32 + lane
                if c >= K: continue
                for t in range(nt): dx[t0 + t, c] = part[:, t, lane].sum()
    return dx


if __name__ == "__main__":
    torch.manual_seed(0)
    for (n, m, R, K, T) in [(2, 4, 70, 37, 20), (3, 8, 24, 300, 16), (15, 16, 5, 70, 3),
                            (1, 8, 66, 33, 130), (4, 16, 3, 100, 65), (3, 4, 9, 7, 5),
                            (1, 16, 4, 600, 3), (2, 8, 5, 1000, 2), (1, 4, 3, 700, 9),
                            (2, 16, 3, 530, 2)]:
        w = NMWeight.from_dense(torch.randn(R, K), n, m)
        x = torch.randn(T, K, dtype=torch.float64)
        ref = x @ w.to_dense().double().t()
        for TT in (1, 8):
            assert torch.allclose(warp_kernel(w.values, w.metadata, x, n, m, K, TT), ref, atol=1e-9)
        assert torch.allclose(tiled_kernel(w.values, w.metadata, x, n, m, K), ref, atol=1e-9)
        for splits in (1, 3):
            assert torch.allclose(mma_kernel(w.values, w.metadata, x, n, m, K, splits), ref,
                                  atol=1e-9)
        dy = torch.randn(T, R, dtype=torch.float64)
        assert torch.allclose(grad_input_kernel(w.values, w.metadata, dy, n, m, K),
                              dy @ w.to_dense().double(), atol=1e-9)
        # random metadata: slots naming one column are summed, as the CPU op does
        junk = torch.randint(0, 256, w.metadata.shape, dtype=torch.uint8)
        cpu = torch.ops.sparse_ext.nm_linear(x, w.values.double(), junk, None, n, m)
        assert torch.allclose(mma_kernel(w.values, junk, x, n, m, K), cpu, atol=1e-9)
        assert torch.allclose(warp_kernel(w.values, junk, x, n, m, K, 8), cpu, atol=1e-9)
        print("ok", f"{n}:{m}", (R, K), "tokens", T)
