// Minimal x86 emulation of the NEON intrinsics conv-neon.cpp uses (compile + logic check only).
#pragma once
typedef float float32x4_t __attribute__((vector_size(16)));
static inline float32x4_t vdupq_n_f32(float v) { return float32x4_t{v, v, v, v}; }
static inline float32x4_t vld1q_f32(const float* p) { float32x4_t r; __builtin_memcpy(&r, p, 16); return r; }
static inline float32x4_t vld1q_dup_f32(const float* p) { return vdupq_n_f32(*p); }
static inline void vst1q_f32(float* p, float32x4_t v) { __builtin_memcpy(p, &v, 16); }
static inline float32x4_t vfmaq_f32(float32x4_t a, float32x4_t b, float32x4_t c) { return a + b * c; }
static inline float32x4_t vmaxq_f32(float32x4_t a, float32x4_t b) { float32x4_t r; for (int i = 0; i < 4; ++i) r[i] = (a[i] != a[i] || b[i] != b[i]) ? a[i] + b[i] : (a[i] > b[i] ? a[i] : b[i]); return r; }
static inline float32x4_t vminq_f32(float32x4_t a, float32x4_t b) { float32x4_t r; for (int i = 0; i < 4; ++i) r[i] = (a[i] != a[i] || b[i] != b[i]) ? a[i] + b[i] : (a[i] < b[i] ? a[i] : b[i]); return r; }
