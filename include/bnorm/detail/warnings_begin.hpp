// Opens a region of bnorm's code in which known false alarms are silenced; warnings_end.hpp
// closes it. No include guard: each header that needs the region includes both.
//
// GCC 12's AVX-512 intrinsics trip its own -Wmaybe-uninitialized (GCC bug 105593) wherever they
// are inlined; keep that false alarm out of users' -Werror builds.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
