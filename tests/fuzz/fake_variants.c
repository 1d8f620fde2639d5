/* A stand-in for the generated sgmv_variants.c + sgmv_cubins.S + sgmv_params.h, so that csrc/
 * builds without Triton for the sanitizer and fuzz builds (the tests generate sgmv_params.h and
 * sgmv_rules.h from the real sources). Its "cubins" are dummy bytes: no driver ever loads them (no_driver.c hides libcuda). */
#include "variant.h"

static const unsigned char fake_cubin[16] = "not a cubin";

const sgmv_tile_t sgmv_tiles[] = {
    {"decode", 16, 128, 16, 4, 2},
    {"unaligned", 32, 64, 16, 4, 2},
};
const sgmv_rule_t sgmv_rules[] = {
    {SGMV_OP_EXPAND, 90, 1, -1, 0, 1, 0},
    {SGMV_OP_EXPAND, 90, -1, -1, 0, 0, 0},
    {SGMV_OP_SHRINK, 90, -1, -1, 0, 0, 0},
};
const int sgmv_num_rules = 3;
const sgmv_grouped_rule_t sgmv_grouped_rules[] = {
    {SGMV_OP_EXPAND, 90, -1, -1, 0, 0},
    {SGMV_OP_SHRINK, 90, -1, -1, 0, 0},
};
const int sgmv_num_grouped_rules = 2;
const sgmv_plan_size_t sgmv_plan_size = {8, 256, 16, 4};
const sgmv_split_rule_t sgmv_split_rule = {264, 8, 512};
const int sgmv_unaligned_tile = 1;
const sgmv_tuning_t sgmv_tuning = {4096, 256, 4, 4096, 64};
const char sgmv_archs_list[] = "90";

sgmv_variant_t sgmv_variants[] = {
    {{90, SGMV_KERNEL_EXPAND, 0, 1, SGMV_DTYPE_FLOAT16, SGMV_DTYPE_FLOAT16, SGMV_DTYPE_FLOAT16, 1},
     "fake_sm90_fp16_fp16_fp16_k1_decode_short", "sgmv_kernel", fake_cubin, fake_cubin + sizeof fake_cubin,
     4608, 4, NULL, NULL, 0},
    {{90, SGMV_KERNEL_EXPAND, 1, 0, SGMV_DTYPE_BFLOAT16, SGMV_DTYPE_BFLOAT16, SGMV_DTYPE_FLOAT32, 0},
     "fake_sm90_bf16_bf16_fp32_k0_unaligned_rows", "sgmv_kernel", fake_cubin,
     fake_cubin + sizeof fake_cubin, 8192, 4, NULL, NULL, 0},
    {{90, SGMV_KERNEL_PLAN, 0, 0, 0, 0, 0, 0}, "fake_sm90_plan", "sgmv_plan_kernel", fake_cubin,
     fake_cubin + sizeof fake_cubin, 0, 4, NULL, NULL, 0},
};
const int sgmv_num_variants_total = sizeof sgmv_variants / sizeof sgmv_variants[0];
