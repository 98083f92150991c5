/* pyconfig.h for building edgegw's stable-ABI extension (edgegw/stdf/_accel.c) for
 * 64-bit Windows CPython with MinGW-w64, from Linux (packaging/build-windows-wheel.sh).
 *
 * CPython's own Windows pyconfig.h (PC/pyconfig.h) is written for MSVC and is not in a
 * Linux Python's headers; these are the facts of the win_amd64 platform the public
 * headers need under Py_LIMITED_API: LLP64 sizes (long is 4 bytes), a 64-bit Py_ssize_t,
 * and the Python API imported from a DLL.  The extension links to python3.dll (the stable
 * ABI), never to a version's python3XX.dll.
 */
#ifndef Py_CONFIG_H
#define Py_CONFIG_H

#if !defined(__MINGW64__) || !defined(_WIN64)
#error "pyconfig-mingw64.h is for x86_64-w64-mingw32-gcc only"
#endif
#ifndef Py_LIMITED_API
#error "pyconfig-mingw64.h serves the stable ABI (Py_LIMITED_API) only"
#endif

#include <basetsd.h>
#include <limits.h>
#include <stdint.h>

#define MS_WIN32
#define MS_WIN64
#define MS_WINDOWS
#define NT_THREADS
#define WITH_THREAD
#define Py_ENABLE_SHARED 1
#define HAVE_DECLSPEC_DLL

/* LLP64 */
#define SIZEOF_SHORT 2
#define SIZEOF_INT 4
#define SIZEOF_LONG 4
#define SIZEOF_LONG_LONG 8
#define SIZEOF_FLOAT 4
#define SIZEOF_DOUBLE 8
#define SIZEOF_VOID_P 8
#define SIZEOF_SIZE_T 8
#define SIZEOF_TIME_T 8
#define SIZEOF_OFF_T 4
#define SIZEOF_FPOS_T 8
#define SIZEOF_WCHAR_T 2
#define SIZEOF__BOOL 1
#define SIZEOF_PID_T SIZEOF_INT
#define SIZEOF_HKEY 8
#define ALIGNOF_SIZE_T 8
#define ALIGNOF_LONG 4
#define ALIGNOF_MAX_ALIGN_T 16
#define LONG_BIT 32
#define HAVE_LONG_LONG 1
#define PY_LONG_LONG long long
#define PY_LLONG_MIN LLONG_MIN
#define PY_LLONG_MAX LLONG_MAX
#define PY_ULLONG_MAX ULLONG_MAX

/* what Windows CPython's pyconfig.h gives for these */
typedef __int64 Py_ssize_t;
#define HAVE_PY_SSIZE_T 1
#define PY_SSIZE_T_MAX LLONG_MAX
#define HAVE_USABLE_WCHAR_T 1
#define HAVE_WCHAR_H 1
#define HAVE_STDDEF_H 1
#define HAVE_SYS_STAT_H 1
#define HAVE_ERRNO_H 1
#define HAVE_FCNTL_H 1
#define HAVE_SIGNAL_H 1
#define HAVE_IO_H 1
#define HAVE_DIRECT_H 1
#define HAVE_PROCESS_H 1
#define HAVE_CLOCK 1
#define HAVE_STRFTIME 1
#define HAVE_COPYSIGN 1
#define HAVE_ROUND 1
#define HAVE_HYPOT 1
#define DONT_HAVE_SIG_ALARM
#define DONT_HAVE_SIG_PAUSE
#define Py_IS_NAN(X) isnan(X)
#define PY_SUPPORT_TIER 1
#define DOUBLE_IS_LITTLE_ENDIAN_IEEE754 1
#define PLATFORM "win32"

#endif /* !Py_CONFIG_H */
