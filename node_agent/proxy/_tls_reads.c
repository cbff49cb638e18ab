/*
 * A TLS connection's decrypted bytes, read in one call per read event
 * (tls_transport.py, TlsTransport._read_into).
 *
 * Why C: OpenSSL hands over one record (16 KiB at most) per SSL_read, so a
 * read event of bulk data is a dozen reads, and in Python each was a call
 * into the ssl module (argument parsing, a GIL release, its error mapping),
 * a memoryview slice and a ctypes call to SSL_has_pending: together the
 * largest piece of the receiving proxy's Python per byte (docs/proxy.md,
 * "Where the time goes").
 *
 * OpenSSL's functions are the ones Python's ssl module runs on, passed in
 * as the addresses ctypes found them at (bind): this module links against no
 * OpenSSL of its own, so it cannot end up calling a second one.
 *
 * read_into(ssl, fd, buffer) -> (count, outcome) reads records into
 * `buffer` until it is full ("full"), OpenSSL holds nothing more ("drained":
 * the kernel reports the rest, if any), the peer closed ("eof", with or
 * without close_notify, as SSLSocket reads it), or an error, which is the
 * outcome itself: an OSError for the socket's, an ssl.SSLError with
 * OpenSSL's reason for the protocol's. `count` is what was read before any
 * of these.
 *
 * "Drained" after data is checked against the socket's pending error
 * (SO_ERROR, one getsockopt): when the kernel reports an error with the
 * event (a reset behind the last bytes), libuv stops watching the socket
 * and uvloop runs the reader one last time, so an error left for the next
 * event would never be read, and the connection would hang.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

/* openssl/ssl.h and openssl/err.h: stable within OpenSSL 3. */
#define SSL_ERROR_SSL 1
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_SYSCALL 5
#define SSL_ERROR_ZERO_RETURN 6
#define ERR_LIB_SSL 20
#define ERR_SYSTEM_FLAG 0x80000000UL
#define ERR_LIB_OFFSET 23
#define ERR_LIB_MASK 0xFFUL
#define ERR_REASON_MASK 0x7FFFFFUL
#define SSL_R_UNEXPECTED_EOF_WHILE_READING 294

typedef int (*read_ex_fn)(void *ssl, void *buf, size_t num, size_t *readbytes);
typedef int (*has_pending_fn)(const void *ssl);
typedef int (*get_error_fn)(const void *ssl, int ret);
typedef unsigned long (*err_get_error_fn)(void);
typedef void (*err_clear_error_fn)(void);
typedef void (*err_error_string_n_fn)(unsigned long error, char *buf, size_t len);

static struct {
	read_ex_fn read_ex;
	has_pending_fn has_pending;
	get_error_fn get_error;
	err_get_error_fn err_get_error;
	err_clear_error_fn err_clear_error;
	err_error_string_n_fn err_error_string_n;
} openssl;

static PyObject *str_full, *str_drained, *str_eof, *ssl_error;

static void *address_of(PyObject *value, const char *what)
{
	void *address = PyLong_AsVoidPtr(value);
	if (address == NULL && !PyErr_Occurred())
		PyErr_Format(PyExc_ValueError, "bind: no address for %s", what);
	return address;
}

PyDoc_STRVAR(bind_doc, "bind(SSL_read_ex, SSL_has_pending, SSL_get_error, ERR_get_error,\n"
		       "     ERR_clear_error, ERR_error_string_n)\n"
		       "\n"
		       "The OpenSSL functions read_into calls, as addresses.");

static PyObject *bind_openssl(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
	(void)module;
	if (nargs != 6) {
		PyErr_SetString(PyExc_TypeError, "bind takes six function addresses");
		return NULL;
	}
	void *found[6];
	static const char *const names[6] = { "SSL_read_ex", "SSL_has_pending", "SSL_get_error",
					      "ERR_get_error", "ERR_clear_error",
					      "ERR_error_string_n" };
	for (int i = 0; i < 6; i++) {
		found[i] = address_of(args[i], names[i]);
		if (found[i] == NULL)
			return NULL;
	}
	openssl.read_ex = (read_ex_fn)found[0];
	openssl.has_pending = (has_pending_fn)found[1];
	openssl.get_error = (get_error_fn)found[2];
	openssl.err_get_error = (err_get_error_fn)found[3];
	openssl.err_clear_error = (err_clear_error_fn)found[4];
	openssl.err_error_string_n = (err_error_string_n_fn)found[5];
	Py_RETURN_NONE;
}

/* The outcome of a failed SSL_read_ex, as SSLSocket.recv_into would have met it. */
static PyObject *outcome_of(int error, int saved_errno)
{
	if (error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE) {
		/* (or only a session ticket or a key update came) */
		return Py_NewRef(str_drained);
	}
	if (error == SSL_ERROR_ZERO_RETURN)
		return Py_NewRef(str_eof);
	unsigned long queued = openssl.err_get_error();
	if (error == SSL_ERROR_SYSCALL && queued == 0) {
		if (saved_errno == 0)
			return Py_NewRef(str_eof); /* closed without close_notify */
		return PyObject_CallFunction(PyExc_OSError, "is", saved_errno,
					     strerror(saved_errno));
	}
	if (queued != 0 && !(queued & ERR_SYSTEM_FLAG) &&
	    ((queued >> ERR_LIB_OFFSET) & ERR_LIB_MASK) == ERR_LIB_SSL &&
	    (queued & ERR_REASON_MASK) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
		openssl.err_clear_error();
		return Py_NewRef(str_eof);
	}
	char reason[256] = "no reason given";
	if (queued != 0)
		openssl.err_error_string_n(queued, reason, sizeof(reason));
	openssl.err_clear_error();
	return PyObject_CallFunction(ssl_error, "is", error, reason);
}

PyDoc_STRVAR(read_into_doc, "read_into(ssl, fd, buffer) -> (count, outcome)\n"
			    "\n"
			    "Decrypted bytes of the SSL* at `ssl` into `buffer` (see the module's "
			    "header).");

static PyObject *read_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
	(void)module;
	if (nargs != 3) {
		PyErr_SetString(PyExc_TypeError, "read_into takes an SSL*, its socket and a buffer");
		return NULL;
	}
	if (openssl.read_ex == NULL) {
		PyErr_SetString(PyExc_RuntimeError, "read_into before bind");
		return NULL;
	}
	void *ssl = PyLong_AsVoidPtr(args[0]);
	if (ssl == NULL) {
		if (!PyErr_Occurred())
			PyErr_SetString(PyExc_ValueError, "read_into: a null SSL*");
		return NULL;
	}
	long fd = PyLong_AsLong(args[1]);
	if (fd == -1 && PyErr_Occurred())
		return NULL;
	if (fd < 0 || fd > INT_MAX) {
		PyErr_SetString(PyExc_ValueError, "read_into: not a file descriptor");
		return NULL;
	}
	Py_buffer buffer;
	if (PyObject_GetBuffer(args[2], &buffer, PyBUF_WRITABLE) < 0)
		return NULL;
	char *into = buffer.buf;
	size_t room = (size_t)buffer.len, got = 0;
	int ok = 1, drained = 0, error = 0, saved_errno = 0;
	/* Non-blocking: each call returns at once, and other threads run meanwhile. */
	Py_BEGIN_ALLOW_THREADS
	/* SSL_get_error reads the thread's error queue: it must start empty. */
	openssl.err_clear_error();
	while (got < room) {
		size_t n = 0;
		errno = 0;
		ok = openssl.read_ex(ssl, into + got, room - got, &n);
		if (!ok) {
			saved_errno = errno;
			error = openssl.get_error(ssl, ok);
			break;
		}
		got += n;
		if (!openssl.has_pending(ssl)) {
			drained = 1;
			break;
		}
	}
	if (drained) {
		int pending = 0;
		socklen_t size = sizeof(pending);
		if (getsockopt((int)fd, SOL_SOCKET, SO_ERROR, &pending, &size) < 0)
			pending = errno;
		if (pending != 0) {
			ok = 0;
			error = SSL_ERROR_SYSCALL;
			saved_errno = pending;
		}
	}
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&buffer);
	PyObject *outcome;
	if (!ok)
		outcome = outcome_of(error, saved_errno);
	else
		outcome = Py_NewRef(drained ? str_drained : str_full);
	if (outcome == NULL)
		return NULL;
	return Py_BuildValue("(nN)", (Py_ssize_t)got, outcome);
}

static PyMethodDef tls_reads_methods[] = {
	{ "bind", (PyCFunction)(void (*)(void))bind_openssl, METH_FASTCALL, bind_doc },
	{ "read_into", (PyCFunction)(void (*)(void))read_into, METH_FASTCALL, read_into_doc },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef tls_reads_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "node_agent.proxy._tls_reads",
	.m_doc = PyDoc_STR("A TLS connection's decrypted bytes, read in one call per read event."),
	.m_size = -1,
	.m_methods = tls_reads_methods,
};

PyMODINIT_FUNC PyInit__tls_reads(void)
{
	str_full = PyUnicode_InternFromString("full");
	str_drained = PyUnicode_InternFromString("drained");
	str_eof = PyUnicode_InternFromString("eof");
	if (str_full == NULL || str_drained == NULL || str_eof == NULL)
		return NULL;
	PyObject *ssl = PyImport_ImportModule("ssl");
	if (ssl == NULL)
		return NULL;
	ssl_error = PyObject_GetAttrString(ssl, "SSLError");
	Py_DECREF(ssl);
	if (ssl_error == NULL)
		return NULL;
	return PyModule_Create(&tls_reads_module);
}
