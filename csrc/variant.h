/* Types of the dispatch table that aot/generate.py emits (sgmv_variants.c in the build folder). */
#ifndef SGMV_VARIANT_H
#define SGMV_VARIANT_H

#include "sgmv.h"

typedef struct {
  const char *name;
  int block_m, block_n, block_k;
  int short_segments; /* 1: the rows of a tile are block_m segments (kernels/sgmv_expand.py) */
  int num_warps, num_stages;
} sgmv_tile_t;

/* On arch, max_seq_length <= max_seq and rank <= max_rank (-1: any) select tile. */
typedef struct {
  int arch, max_seq, max_rank, tile;
} sgmv_rule_t;

/* What a variant is specialised on; compared as a whole. */
typedef struct {
  int arch, tile;
  int x_dtype, w_dtype, out_dtype; /* metadata dtype: a kernel argument, not a variant */
  int even_k, add_inputs;
} sgmv_variant_key_t;

typedef struct {
  sgmv_variant_key_t key;
  const char *name;         /* e.g. sgmv_sm90_bf16_bf16_bf16_i32_k1_a1_prefill */
  const char *kernel_name;  /* the function's name inside the cubin */
  const unsigned char *cubin, *cubin_end;
  int shared;               /* bytes of shared memory per program */
  int num_warps;
  /* Filled at run time, under the loader's lock (csrc/sgmv.c). */
  void *library;            /* CUlibrary */
  void *kernel;             /* CUkernel, published last */
  uint64_t smem_devices;    /* devices whose shared-memory limit was raised for it */
} sgmv_variant_t;

extern const sgmv_tile_t sgmv_tiles[];
extern const sgmv_rule_t sgmv_rules[];
extern const int sgmv_num_rules;
extern const int sgmv_unaligned_tile;
extern const int sgmv_align_elems;
extern const int sgmv_short_programs;
extern const char sgmv_archs_list[];
extern sgmv_variant_t sgmv_variants[];
extern const int sgmv_num_variants_total;

#endif
