/* A stand-in for the generated sgmv_variants.c + sgmv_cubins.S, so that csrc/ builds without
 * Triton for the sanitizer and fuzz builds. Its "cubins" are dummy bytes: no driver ever loads
 * them (no_driver.c hides libcuda from these builds). */
#include "variant.h"

static const unsigned char fake_cubin[16] = "not a cubin";

const sgmv_tile_t sgmv_tiles[] = {
    {"decode", 16, 128, 16, 1, 4, 2},
    {"unaligned", 32, 64, 16, 0, 4, 2},
};
const sgmv_rule_t sgmv_rules[] = {
    {90, -1, -1, 0},
};
const int sgmv_num_rules = 1;
const int sgmv_unaligned_tile = 1;
const int sgmv_align_elems = 8;
const int sgmv_short_programs = 4096;
const char sgmv_archs_list[] = "90";

sgmv_variant_t sgmv_variants[] = {
    {{90, 0, SGMV_DTYPE_FLOAT16, SGMV_DTYPE_FLOAT16, SGMV_DTYPE_FLOAT16, 1, 0},
     "fake_sm90_fp16_fp16_fp16_i32_k1_a0_decode", "sgmv_expand_kernel", fake_cubin, fake_cubin + sizeof fake_cubin,
     4608, 4, NULL, NULL, 0},
    {{90, 1, SGMV_DTYPE_BFLOAT16, SGMV_DTYPE_BFLOAT16, SGMV_DTYPE_FLOAT32, 0, 1},
     "fake_sm90_bf16_bf16_fp32_i64_k0_a1_unaligned", "sgmv_expand_kernel", fake_cubin,
     fake_cubin + sizeof fake_cubin, 8192, 4, NULL, NULL, 0},
};
const int sgmv_num_variants_total = sizeof sgmv_variants / sizeof sgmv_variants[0];
