"""C declarations of the tvm-ffi ABI that the thin runtime uses (a subset of tvm/ffi/c_api.h)."""

CDEF = r"""
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensor* self);
} DLManagedTensor;

typedef void* TVMFFIObjectHandle;
typedef struct {
  uint64_t combined_ref_count;
  int32_t type_index;
  uint32_t padding;
  void* deleter;
} TVMFFIObject;
typedef struct {
  int32_t type_index;
  uint32_t zero_padding;
  union {
    int64_t v_int64;
    double v_float64;
    void* v_ptr;
    const char* v_c_str;
    TVMFFIObject* v_obj;
    DLDataType v_dtype;
    DLDevice v_device;
    char v_bytes[8];
    uint64_t v_uint64;
  };
} TVMFFIAny;
typedef struct { const char* data; size_t size; } TVMFFIByteArray;
typedef struct {
  TVMFFIByteArray kind;
  TVMFFIByteArray message;
  TVMFFIByteArray backtrace;
} TVMFFIErrorCellPrefix;

int TVMFFIObjectIncRef(TVMFFIObjectHandle obj);
int TVMFFIObjectDecRef(TVMFFIObjectHandle obj);
int TVMFFIFunctionGetGlobal(const TVMFFIByteArray* name, TVMFFIObjectHandle* out);
int TVMFFIFunctionCall(TVMFFIObjectHandle func, TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);
void TVMFFIErrorMoveFromRaised(TVMFFIObjectHandle* result);
int TVMFFITensorFromDLPack(DLManagedTensor* from, int32_t require_alignment,
                           int32_t require_contiguous, TVMFFIObjectHandle* out);
typedef int (*TVMFFISafeCallType)(void* handle, const TVMFFIAny* args, int32_t num_args,
                                  TVMFFIAny* result);
int TVMFFIFunctionCreate(void* self, TVMFFISafeCallType safe_call, void (*deleter)(void* self),
                         TVMFFIObjectHandle* out);
int TVMFFIFunctionSetGlobal(const TVMFFIByteArray* name, TVMFFIObjectHandle f, int allow_override);
int TVMFFIBytesFromByteArray(const TVMFFIByteArray* input, TVMFFIAny* out);
int TVMFFIStringFromByteArray(const TVMFFIByteArray* input, TVMFFIAny* out);
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message);
"""

# Type indices from tvm/ffi/c_api.h (TVMFFITypeIndex).
NONE = 0
INT = 1
BOOL = 2
FLOAT = 3
OPAQUE_PTR = 4
DATA_TYPE = 5
DEVICE = 6
DLTENSOR_PTR = 7
RAW_STR = 8
SMALL_STR = 11
SMALL_BYTES = 12
STATIC_OBJECT_BEGIN = 64
STR = 65
BYTES = 66
ERROR = 67
FUNCTION = 68
SHAPE = 69
TENSOR = 70
ARRAY = 71
MODULE = 73

# Size of TVMFFIObject, the header that precedes every object's payload.
OBJECT_HEADER_BYTES = 24


def payload(ffi, handle, ctype: str):
    """``handle``'s payload (what follows the object header) as a ``ctype`` pointer, in ``ffi``."""
    return ffi.cast(ctype, ffi.cast("char*", handle) + OBJECT_HEADER_BYTES)


def byte_array_payload(ffi, handle) -> bytes:
    """The bytes of a String or Bytes object (its payload is a TVMFFIByteArray)."""
    cell = payload(ffi, handle, "TVMFFIByteArray*")
    return bytes(ffi.buffer(cell.data, cell.size))

# DLPack device types and data type codes.
DEVICE_CPU = 1
DEVICE_CUDA = 2
DL_INT, DL_UINT, DL_FLOAT, DL_BFLOAT, DL_BOOL = 0, 1, 2, 4, 6
