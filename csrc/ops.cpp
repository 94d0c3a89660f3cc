// The op schemas of torch_rankone and the Python module torch_rankone._C, whose import
// registers them. Implementations: cpu/ops_cpu.cpp (CPU), cuda/ops_cuda.cu (CUDA).
//
// U is passed flat, column-major: U[j·n + i] is column j's tensor for parameter i (n = len(g)),
// and the rank k is C.size(0). c and lr are 0-d tensors on the CPU (read on the host) or on the
// tensors' device (read by the kernels, so no host synchronisation).
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"

TORCH_LIBRARY(torch_rankone, m) {
  // y = (c·I + U C Uᵀ)⁻¹ g, all tensors shaped like g.
  m.def("lowrank_solve(Tensor[] g, Tensor[] U, Tensor C, Tensor c) -> Tensor[]");
  // The same y, and the sums of pass 1: G = UᵀU (packed lower triangle) then b = Uᵀg, in float64
  // (the checked solve inspects them afterwards instead of a second pass). CPU only.
  m.def("lowrank_solve_gram(Tensor[] g, Tensor[] U, Tensor C, Tensor c) -> (Tensor[], Tensor)");
  // params ← params − lr · (c·I + U C Uᵀ)⁻¹ g, in place, only if the solve succeeded (the
  // coefficients and lr/c finite); returns that as a 0-d bool tensor on the params' device.
  m.def(
      "lowrank_solve_update(Tensor(a!)[] params, Tensor[] g, Tensor[] U, Tensor C, Tensor c, "
      "Tensor lr) -> Tensor");
  // H += Σ_t coef[t] · A[idx[t]] A[idx[t]]ᵀ, in place.
  m.def("gathered_outer_accumulate(Tensor(a!) H, Tensor A, Tensor idx, Tensor coef) -> ()");
}

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(torch_rankone::cpu::isa());
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  if (!torch_rankone::cpu::set_isa(name)) {
    PyErr_Format(PyExc_ValueError,
                 "set_cpu_isa: %s is not available on this CPU/build "
                 "(choose 'auto', 'baseline' or 'avx2')",
                 name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "cpu_isa() -> str: the CPU kernel variant in use, 'avx2' (AVX2+FMA) or 'baseline'."},
    {"set_cpu_isa", set_cpu_isa, METH_O,
     "set_cpu_isa(name): use the 'baseline' or 'avx2' CPU kernels, or 'auto' (the best one)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "torch_rankone._C",
                      "Compiled kernels of torch_rankone; importing registers "
                      "torch.ops.torch_rankone.*",
                      -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#if defined(TORCH_RANKONE_WITH_CUDA)
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "with_cuda", with_cuda) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
