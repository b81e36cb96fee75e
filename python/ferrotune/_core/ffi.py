# auto-generated file
import _cffi_backend

ffi = _cffi_backend.FFI('ffi',
    _version = 0x2601,
    _types = b'',
    _globals = (b'\xFF\xFF\xFF\x1FATTN_TILE',64,b'\xFF\xFF\xFF\x1FCE_CHUNK',2048,b'\xFF\xFF\xFF\x1FCOMPUTE_32F',68,b'\xFF\xFF\xFF\x1FCOMPUTE_32F_FAST_TF32',77,b'\xFF\xFF\xFF\x1FDEFAULT_PACK_WINDOW',8192,b'\xFF\xFF\xFF\x1FGEMM_DEFAULT',-1,b'\xFF\xFF\xFF\x1FIGNORE_INDEX',-100,b'\xFF\xFF\xFF\x1FMAX_ROWS',16,b'\xFF\xFF\xFF\x1FNCCL_FLOAT32',7,b'\xFF\xFF\xFF\x1FNCCL_SUM',0,b'\xFF\xFF\xFF\x1FOP_N',0,b'\xFF\xFF\xFF\x1FOP_T',1,b'\xFF\xFF\xFF\x1FR_16BF',14,b'\xFF\xFF\xFF\x1FR_16F',2,b'\xFF\xFF\xFF\x1FR_32F',0),
)
