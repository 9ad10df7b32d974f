"""What the fused decode step needs beyond the kernels: a spin barrier, and arrays by address.

The fused decode step (:mod:`.decoder`) runs on every kernel thread at the same time, each
thread computing its share of a layer's rows, and meets the others between the phases of a layer
(after q/k/v, after attention, ...). Numba has no atomics for CPU code, so this module adds the
two it needs as LLVM instructions (sequentially consistent 64-bit load and store) and builds a
barrier on them that needs no read-modify-write: each thread owns one counter, on its own cache
line, and only ever writes its own.

    arrive = np.zeros(threads * LINE, dtype=np.int64)   # zeroed before the threads start
    barrier(arrive, t, threads, k)                      # k-th meeting: 1, 2, 3, ...

A thread that waits spins with ``pause`` and, after a while, gives its core away with
``sched_yield``: on a machine with more runnable threads than cores, the thread it waits for may
be the one that needs this core.

:func:`voidptr_at` turns an address (an int64, e.g. ``ndarray.ctypes.data``) into a pointer for
``numba.carray``: the step reads each layer's packed arrays through a table of their addresses
instead of a typed list, so every argument it takes is a plain array or number, and its machine
code can be saved in an artifact like a kernel's. The caller keeps those arrays alive.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: int64 slots between two threads' counters: one 64-byte cache line each
LINE = 8

#: spins (each a ``pause``) before a waiting thread starts yielding its core
SPINS_BEFORE_YIELD = 2000

_I64 = ir.IntType(64)


def _slot(context, builder, arrty, arr, idx, idxty) -> ir.Value:
    ary = context.make_array(arrty)(context, builder, value=arr)
    return builder.gep(ary.data, [context.cast(builder, idx, idxty, types.int64)])


@intrinsic
def atomic_load(typingctx, arr, index):
    """``arr[index]`` (int64) read with a sequentially consistent atomic load."""

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig.args[0], args[0], args[1], sig.args[1]),
                                   "seq_cst", 8)

    return types.int64(arr, index), codegen


@intrinsic
def atomic_store(typingctx, arr, index, value):
    """``arr[index] = value`` (int64) with a sequentially consistent atomic store."""

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(v, _slot(context, builder, sig.args[0], args[0], args[1], sig.args[1]), "seq_cst", 8)
        return context.get_dummy_value()

    return types.void(arr, index, value), codegen


@intrinsic
def cpu_relax(typingctx):
    """One ``pause`` (x86): tells the core this is a spin loop."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def yield_core(typingctx):
    """``sched_yield()`` from the C library (looked up by name when the code is linked)."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def voidptr_at(typingctx, address):
    """The int64 ``address`` as a ``void*`` (for ``numba.carray(ptr, n, dtype)``)."""

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.int64)
        return builder.inttoptr(v, ir.IntType(8).as_pointer())

    return types.voidptr(address), codegen


@njit(nogil=True, cache=True)
def barrier(arrive, t, threads, k):
    """Wait until each of ``threads`` threads has reached meeting ``k`` (1, 2, ...); ``t`` is the
    caller. Every write a thread made before its call is visible to the others after theirs."""
    if threads == 1:
        return
    atomic_store(arrive, t * LINE, k)
    for j in range(threads):
        spins = 0
        while atomic_load(arrive, j * LINE) < k:
            spins += 1
            if spins < SPINS_BEFORE_YIELD:
                cpu_relax()
            else:
                yield_core()
