import torch, triton, sgmv, sgmv.jit as J
from sgmv._variants import TILES, Tile
import itertools, time
def mk(T_lens, N, R, L, dt=torch.bfloat16):
    T=sum(T_lens); x=torch.randn(T,R,device='cuda',dtype=dt); w=torch.randn(L,N,R,device='cuda',dtype=dt)
    out=torch.randn(T,N,device='cuda',dtype=dt)
    st=torch.tensor([sum(T_lens[:i]) for i in range(len(T_lens))],device='cuda',dtype=torch.int32)
    ln=torch.tensor(T_lens,device='cuda',dtype=torch.int32); ix=torch.randint(0,L,(len(T_lens),),device='cuda',dtype=torch.int32)
    return (x,w,out,st,ln,ix,len(T_lens),max(T_lens),True)
cases={"prefill4x512_r16":([512]*4,4096,16,4),"prefill8x1024_r64":([1024]*8,4096,64,8),"skew":([4000]+[10]*8,4096,16,4),
"128x16_r16":([16]*128,4096,16,8),"decode256_r16":([1]*256,4096,16,4),"decode64_r8":([1]*64,4096,8,4),"decode32_N14336_r64":([1]*32,14336,64,8),
"16x4096_r32":([4096]*16,4096,32,4)}
tiles={}
for bm,bn,bk,w,s in [(16,128,16,4,2),(16,256,16,4,2),(32,128,16,4,2),(64,128,16,4,2),(64,128,32,4,2),(64,256,16,4,2),(64,256,16,8,2),(128,128,16,4,2),(128,256,16,8,2),(64,64,16,4,2),(32,64,16,4,2),(64,128,16,4,3)]:
    tiles[f"{bm}x{bn}x{bk}w{w}s{s}"]=Tile(bm,bn,bk,1,w,s)
tiles["dec8"]=Tile(16,128,16,8,4,2); tiles["dec4_256"]=Tile(16,256,16,4,4,2)
for n,t in tiles.items(): TILES[n]=t
print("case".ljust(22), "aot".rjust(8), " ".join(n.rjust(10) for n in tiles))
for cn,(lens,N,R,L) in cases.items():
    a=mk(lens,N,R,L)
    res=[triton.testing.do_bench(lambda: sgmv.sgmv_expand(*a), warmup=5, rep=30, return_mode="median")*1e3]
    for n in tiles:
        try: res.append(triton.testing.do_bench(lambda: J.sgmv_expand(*a, tile=n), warmup=5, rep=30, return_mode="median")*1e3)
        except Exception as e: res.append(float('nan')); print(n, e)
    print(cn.ljust(22), " ".join(f"{r:10.1f}" for r in res))
# host overhead
a=mk([1]*8,4096,16,4)
for name,f in [("aot",lambda: sgmv.sgmv_expand(*a)),("jit",lambda: J.sgmv_expand(*a))]:
    for _ in range(100): f()
    torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(2000): f()
    dt=(time.perf_counter()-t)/2000; torch.cuda.synchronize(); print(name,"host us/call",dt*1e6)
