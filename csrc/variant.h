/* Types of the tables that aot/generate.py emits (sgmv_variants.c in the build folder), and the
 * planner's internal interface. */
#ifndef SGMV_VARIANT_H
#define SGMV_VARIANT_H

#include "sgmv.h"
#include "sgmv_rules.h" /* generated: SGMV_OP_*, the plan layout, alignment, the dtype matrix */

typedef struct {
  const char *name;
  int block_m, block_n, block_k, num_warps, num_stages;
} sgmv_tile_t;

/* Without a plan: for op on arch, max_seq_length <= max_seq and rank <= max_rank (-1: any)
 * select tile, on the short path if short_path. fp8: a rule for fp8 weights (1) or the others (0);
 * an arch without fp8 rules has no fp8 variants. */
typedef struct {
  int op, arch, max_seq, max_rank, tile, short_path, fp8;
} sgmv_rule_t;

/* With a plan: rows per adapter (estimated as cdiv(total_tokens, min(batches, num_loras))) <=
 * max_rows and rank <= max_rank select tile. */
typedef struct {
  int op, arch, max_rows, max_rank, tile, fp8;
} sgmv_grouped_rule_t;

/* Shrink's split of hidden over programs: aimed at `programs` programs, at most max_split, for
 * at most max_tokens rows. */
typedef struct {
  int programs, max_split, max_tokens;
} sgmv_split_rule_t;

/* The planner's other tuning (aot/tiles.json "planner", which says what each is). */
typedef struct {
  int short_programs, uniform_min_length, uniform_slack, plan_rows_per_program, plan_max_programs;
} sgmv_tuning_t;

/* The plan kernel's constexprs: segments per program, segments per scan step, rows per store. */
typedef struct {
  int segs, scan, rows, num_warps;
} sgmv_plan_size_t;

/* A kernel parameter's type (sgmv_params.h): scalars, or a pointer's elements, fixed or the
 * dtype of the call's inputs, weights or output. */
typedef enum {
  SGMV_PARAM_I32, SGMV_PARAM_I64, SGMV_PARAM_FP32, SGMV_PARAM_INPUTS, SGMV_PARAM_WEIGHTS, SGMV_PARAM_OUTPUT
} sgmv_param_type_t;

/* sgmv_kernel's expand and shrink (its SHRINK constexpr), sgmv_plan_kernel */
enum { SGMV_KERNEL_EXPAND = 0, SGMV_KERNEL_PLAN = 1, SGMV_KERNEL_SHRINK = 2 };

/* What a variant is specialised on; compared as a whole. For the plan kernel, tile indexes
 * and the rest are 0. */
typedef struct {
  int arch, kernel, tile, path;
  int x_dtype, w_dtype, out_dtype;
  int even_k;
} sgmv_variant_key_t;

typedef struct {
  sgmv_variant_key_t key;
  const char *name;         /* e.g. sgmv_sm90_bf16_bf16_bf16_k1_prefill_r16 */
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
extern const sgmv_grouped_rule_t sgmv_grouped_rules[];
extern const int sgmv_num_grouped_rules;
extern const sgmv_plan_size_t sgmv_plan_size;
extern const sgmv_split_rule_t sgmv_split_rule;
extern const int sgmv_unaligned_tile;
extern const sgmv_tuning_t sgmv_tuning;
extern const char sgmv_archs_list[];
extern sgmv_variant_t sgmv_variants[];
extern const int sgmv_num_variants_total;

/* ---- csrc/planner.c -------------------------------------------------------------------------- */

/* The build's archs that have variants for op's weights (fp8: fp8 weights, else the others), as
 * "90,100", or "none". */
void sgmv_archs_with_rules(int op, int fp8, char *list, size_t size);

/* A launch, fully decided: the variant to load and the configuration to launch it with. */
typedef struct {
  sgmv_launch_config_t config;
  sgmv_variant_key_t key;
} sgmv_launch_t;

/* One call of sgmv_kernel, expand or shrink, checked: what the planner decides from and the
 * launcher fills the kernel's parameters from. Slice s's weights are w[s] (rows: its N). */
typedef struct {
  int op;
  const void *x;
  int x_dtype;
  int64_t x_stride, x_slice_step;
  int w_dtype, num_slices;
  sgmv_slice_t w[SGMV_MAX_SLICES];
  sgmv_scales_t ws[SGMV_MAX_SLICES]; /* fp8 weights: each slice's scales (else scales NULL) */
  void *out;
  int out_dtype;
  int64_t out_stride, out_cols;
  int64_t total_tokens, K, num_loras;
  int64_t out_slice_step;        /* shrink: output elements between slices */
  const void *seq_start, *seq_len, *lora_indices;
  int metadata_dtype;
  int per_token;                 /* lora_indices maps rows (batches == total_tokens), no seq_start / seq_len */
  int64_t batches, max_seq_length;
  int add_inputs;
  float scaling;
  const void *ranks, *scales;
  const void *plan;
  size_t plan_bytes;
  void *work;
  size_t work_bytes;
  sgmv_stream_t stream;
} sgmv_call_t;

/* A caller's sgmv_expand_args_t / sgmv_shrink_args_t of any supported size, checked, as a call. */
int sgmv_expand_call(const sgmv_expand_args_t *args, sgmv_call_t *call);
int sgmv_shrink_call(const sgmv_shrink_args_t *args, sgmv_call_t *call);
/* The build's first arch with variants for the call's weights: where checks run before the driver. */
int sgmv_first_arch(const sgmv_call_t *call);
/* want: a tile to plan with instead of the rules' (a tuner's), or NULL. */
int sgmv_decide(const sgmv_call_t *call, int arch, const sgmv_launch_config_t *want, sgmv_launch_t *out);
/* per_token: the metadata is one adapter per row (a step's token mapping; lora_indices holds it). */
int sgmv_decide_batch_plan(const sgmv_batch_plan_args_t *a, int per_token, int arch, sgmv_launch_t *out);

/* The layer call (sgmv_layer_apply): the shrink and the expand it makes, checked. */
int sgmv_layer_calls(const sgmv_layer_t *layer, const sgmv_step_t *step, const sgmv_tensor_t *inputs,
                     const sgmv_tensor_t *output, int add_inputs, sgmv_stream_t stream, sgmv_call_t calls[2]);
/* A step's plan build as batch plan arguments; *per_token says whether its metadata is a token mapping. */
int sgmv_step_plan_args(const sgmv_step_t *step, sgmv_stream_t stream, sgmv_batch_plan_args_t *args, int *per_token);

#endif
