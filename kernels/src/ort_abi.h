/* The slice of onnxruntime's C API that the prototype custom ops use (head_matmul.c, vnni_ops.c), declared here
 * instead of including onnxruntime_c_api.h, which the onnxruntime wheel does not ship: the OrtApi function-table
 * slots and the OrtCustomOp field order follow that header (onnxruntime 1.32, API version 32; the struct of
 * function pointers is append-only, so a slot index is stable). Plus what every op here shares: shapes, input
 * data, the fields of an OrtCustomOp that do not differ between ops, and registering a domain. */
#ifndef DSEDGE_ORT_ABI_H
#define DSEDGE_ORT_ABI_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef void OrtStatus;
typedef struct OrtApiBase {
  const void *const *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

/* OrtApi slots used (index into the table of function pointers). */
enum {
  SLOT_CREATE_STATUS = 0, SLOT_RELEASE_STATUS = 93, SLOT_CREATE_DOMAIN = 26, SLOT_DOMAIN_ADD = 27, SLOT_ADD_DOMAIN = 28,
  SLOT_TENSOR_MUTABLE_DATA = 51, SLOT_DIMS_COUNT = 61, SLOT_DIMS = 62, SLOT_TYPE_AND_SHAPE = 65,
  SLOT_ATTR_INT64 = 86, SLOT_GET_INPUT = 90, SLOT_GET_OUTPUT = 91, SLOT_RELEASE_SHAPE = 99,
  SLOT_PARALLEL_FOR = 274,
};
enum { ORT_FLOAT = 1, ORT_UINT8 = 2, ORT_INT8 = 3 };
#define API_VERSION 17 /* OrtCustomOp version declared; GetApi hands back the one append-only table */

static const void *const *g_api;
#define FN(type, slot) ((type)g_api[slot])
typedef OrtStatus *(*CreateStatusFn)(int code, const char *message);
typedef void (*ReleaseStatusFn)(OrtStatus *);
typedef OrtStatus *(*CreateDomainFn)(const char *, void **);
typedef OrtStatus *(*DomainAddFn)(void *, const void *);
typedef OrtStatus *(*AddDomainFn)(void *, void *);
typedef OrtStatus *(*AttrInt64Fn)(const void *, const char *, int64_t *);
typedef OrtStatus *(*MutableDataFn)(void *, void **);
typedef OrtStatus *(*TypeAndShapeFn)(const void *, void **);
typedef OrtStatus *(*DimsCountFn)(const void *, size_t *);
typedef OrtStatus *(*DimsFn)(const void *, int64_t *, size_t);
typedef void (*ReleaseShapeFn)(void *);
typedef OrtStatus *(*GetInputFn)(void *, size_t, const void **);
typedef OrtStatus *(*GetOutputFn)(void *, size_t, const int64_t *, size_t, void **);
typedef OrtStatus *(*ParallelForFn)(void *, void (*)(void *, size_t), size_t, size_t, void *);

/* OrtCustomOp, field order of onnxruntime_c_api.h: version 1 fields, then those added at 8, 13, 14, 16, 17
 * and later; the later ones stay NULL (onnxruntime reads only what `version` declares). */
typedef struct OrtCustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct OrtCustomOp *, const void *api, const void *info);
  const char *(*GetName)(const struct OrtCustomOp *);
  const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
  int (*GetInputType)(const struct OrtCustomOp *, size_t);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
  int (*GetOutputType)(const struct OrtCustomOp *, size_t);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
  void (*KernelCompute)(void *kernel, void *context); /* left NULL: KernelComputeV2 returns a status */
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);  /* v8 */
  int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
  int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);      /* v13 */
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);        /* v14 */
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
  void *CreateKernelV2;                                                /* v16 */
  OrtStatus *(*KernelComputeV2)(void *kernel, void *context);
  void *InferOutputShapeFn;                                            /* v17 */
  int (*GetStartVersion)(const struct OrtCustomOp *);
  int (*GetEndVersion)(const struct OrtCustomOp *);
  void *later[4];
} OrtCustomOp;

enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 }; /* OrtErrorCode */
#define TRY(call)                      \
  do {                                 \
    OrtStatus *status_ = (call);       \
    if (status_) return status_;       \
  } while (0)

/* A failed call's status that nothing reports (a missing optional attribute, a fallback taken): released. */
__attribute__((unused)) static void drop_status(OrtStatus *status) {
  if (status) FN(ReleaseStatusFn, SLOT_RELEASE_STATUS)(status);
}

/* An error onnxruntime reports for the node: "<op>: <why>". */
__attribute__((unused)) static OrtStatus *op_error(int code, const char *op, const char *why) {
  char message[512];
  snprintf(message, sizeof message, "dsedge-kernels %s: %s", op, why);
  return FN(CreateStatusFn, SLOT_CREATE_STATUS)(code, message);
}

/* The dims of a tensor value (at most max); -1 when it has more or no shape. */
__attribute__((unused)) static int shape_of(const void *value, int64_t *dims, size_t max, size_t *count) {
  void *info = NULL;
  OrtStatus *status = FN(TypeAndShapeFn, SLOT_TYPE_AND_SHAPE)(value, &info);
  if (status) { drop_status(status); return -1; }
  drop_status(FN(DimsCountFn, SLOT_DIMS_COUNT)(info, count));
  if (*count > max) { FN(ReleaseShapeFn, SLOT_RELEASE_SHAPE)(info); return -1; }
  drop_status(FN(DimsFn, SLOT_DIMS)(info, dims, *count));
  FN(ReleaseShapeFn, SLOT_RELEASE_SHAPE)(info);
  return 0;
}

/* Inputs 0..count of the node and their data (every input here is required). */
__attribute__((unused)) static OrtStatus *inputs_of(void *ctx, size_t count, const void **values, void **data) {
  for (size_t i = 0; i < count; ++i) {
    TRY(FN(GetInputFn, SLOT_GET_INPUT)(ctx, i, &values[i]));
    TRY(FN(MutableDataFn, SLOT_TENSOR_MUTABLE_DATA)((void *)values[i], &data[i]));
  }
  return NULL;
}

/* The node's one output, allocated with dims, and its data. */
__attribute__((unused)) static OrtStatus *output_of(void *ctx, const int64_t *dims, size_t n, float **data) {
  void *value = NULL;
  TRY(FN(GetOutputFn, SLOT_GET_OUTPUT)(ctx, 0, dims, n, &value));
  return FN(MutableDataFn, SLOT_TENSOR_MUTABLE_DATA)(value, (void **)data);
}

static const char *cpu_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int float_output(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_FLOAT; }
static size_t one_output(const OrtCustomOp *op) { (void)op; return 1; }
static int required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int default_memory(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int one(const OrtCustomOp *op) { (void)op; return 1; }
static int start_version(const OrtCustomOp *op) { (void)op; return 1; }
static int end_version(const OrtCustomOp *op) { (void)op; return 2147483647; }

/* An op on the CPU provider with one float output, required inputs and outputs, versions 1 and up. */
static void describe_op(OrtCustomOp *op, const char *(*name)(const OrtCustomOp *),
                        void *(*create)(const OrtCustomOp *, const void *, const void *),
                        int (*input_type)(const OrtCustomOp *, size_t), size_t (*inputs)(const OrtCustomOp *),
                        OrtStatus *(*compute)(void *, void *), void (*destroy)(void *)) {
  memset(op, 0, sizeof *op);
  op->version = API_VERSION;
  op->CreateKernel = create;
  op->GetName = name;
  op->GetExecutionProviderType = cpu_provider;
  op->GetInputType = input_type;
  op->GetInputTypeCount = inputs;
  op->GetOutputType = float_output;
  op->GetOutputTypeCount = one_output;
  op->KernelComputeV2 = compute; /* API_VERSION >= 16: onnxruntime calls this one and reports its status */
  op->KernelDestroy = destroy;
  op->GetInputCharacteristic = required;
  op->GetOutputCharacteristic = required;
  op->GetInputMemoryType = default_memory;
  op->GetVariadicInputMinArity = one;
  op->GetVariadicInputHomogeneity = one;
  op->GetVariadicOutputMinArity = one;
  op->GetVariadicOutputHomogeneity = one;
  op->GetStartVersion = start_version;
  op->GetEndVersion = end_version;
}

/* Registers ops[0..count) in a new domain of the session options. */
static OrtStatus *register_domain(void *options, const char *name, OrtCustomOp **ops, size_t count) {
  void *domain = NULL;
  OrtStatus *status = FN(CreateDomainFn, SLOT_CREATE_DOMAIN)(name, &domain);
  for (size_t i = 0; !status && i < count; ++i) status = FN(DomainAddFn, SLOT_DOMAIN_ADD)(domain, ops[i]);
  return status ? status : FN(AddDomainFn, SLOT_ADD_DOMAIN)(options, domain);
}
#endif
