// The overflow bound of the scalar reference's float exp, shared by every tier's vector SiLU so
// that their non-finite results match the reference lane for lane.
#pragma once

namespace sparse_ext {

// The largest float whose std::exp (glibc expf) is finite, 0x1.62e42ep6: expf gives +inf for every
// larger input. SiLU's 1 + exp(-g) is then inf and silu(g) is -0 (or NaN for g = -inf), so a
// vector exp must return inf past it too, not a clamped finite value: -0 * inf is NaN where a
// tiny finite silu times inf would be -inf.
constexpr float kExpfMaxArg = 88.72283172607421875f;

}  // namespace sparse_ext
