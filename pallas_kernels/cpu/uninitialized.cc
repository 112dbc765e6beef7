// An array of any shape and dtype that no code writes: XLA allocates the result buffer and the
// handler returns at once. For memory that is zeroed another way: jpaged.kv_pool hands a new
// KV pool's pages back to the OS kernel (madvise), which maps zero-filled pages when each is
// first touched, instead of writing 4 GiB of zeros at start-up.

#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;

ffi::Error Uninitialized(ffi::Result<ffi::AnyBuffer>) { return ffi::Error::Success(); }

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedUninitialized, Uninitialized, ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
