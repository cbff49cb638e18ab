/*
 * Two socket calls every proxied connection makes, with less Python around
 * them.
 *
 * Why C: at new-connection saturation each connection cost the two proxies
 * 1.3x Envoy's CPU, spread over the interpreter. These two were the costliest
 * leaves of it that are pure overhead: in Python, asking where a captured
 * connection was going built a socket object around uvloop's socket for one
 * getsockopt(2) (socket.py's constructor, a getsockname(2), detach), and an
 * upstream socket in a pod cost two ctypes calls for setns(2) and a
 * setsockopt call.
 *
 * original_destination_v4(sock) answers SO_ORIGINAL_DST for an IPv4 socket;
 * IPv6 stays in original_dst.py (rare, and its address text must match the
 * ipaddress module's, which inet_ntop's does not always).
 *
 * socket_in_netns(netns_fd, home_fd, family, mark, cls=socket.socket) makes
 * a non-blocking TCP socket of netns_fd's namespace, marked, as an instance of
 * cls (a subclass of socket.socket, see sockets.py for why). The thread goes back to
 * home_fd before anything else; if the kernel refuses that, the process
 * ends (as node_agent.netns does), because a thread left inside a pod would
 * make every later socket there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* linux/netfilter_ipv4.h, answered by conntrack (iptables REDIRECT) and by
 * Weir's cgroup/getsockopt program (eBPF capture) alike. */
#define SO_ORIGINAL_DST 80

/* Dotted-quad text of `address` into `out` (at least 16 bytes); its length.
 * By hand: inet_ntop goes through sprintf, a visible share of a connection. */
static Py_ssize_t format_v4(char *out, const struct in_addr *address)
{
	const unsigned char *octets = (const unsigned char *)&address->s_addr;
	char *p = out;
	for (int i = 0; i < 4; i++) {
		unsigned int value = octets[i];
		if (i > 0)
			*p++ = '.';
		if (value >= 100)
			*p++ = (char)('0' + value / 100);
		if (value >= 10)
			*p++ = (char)('0' + value / 10 % 10);
		*p++ = (char)('0' + value % 10);
	}
	return p - out;
}

static PyObject *original_destination_v4(PyObject *module, PyObject *arg)
{
	(void)module;
	int fd = PyObject_AsFileDescriptor(arg);
	if (fd < 0)
		return NULL;
	struct sockaddr_in address;
	socklen_t length = sizeof(address);
	if (getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &address, &length) < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	char text[INET_ADDRSTRLEN];
	PyObject *host = PyUnicode_FromStringAndSize(text, format_v4(text, &address.sin_addr));
	if (host == NULL)
		return NULL;
	PyObject *port = PyLong_FromLong(ntohs(address.sin_port));
	if (port == NULL) {
		Py_DECREF(host);
		return NULL;
	}
	PyObject *pair = PyTuple_Pack(2, host, port);
	Py_DECREF(host);
	Py_DECREF(port);
	return pair;
}

/* socket.socket: the caller wants a Python socket, and made from an fd one
 * costs a getsockname(2) to validate it; made by the class, none. */
static PyObject *socket_class;

static PyObject *socket_in_netns(PyObject *module, PyObject *args)
{
	(void)module;
	int netns_fd, home_fd, family;
	long long mark;
	PyObject *cls = socket_class;
	if (!PyArg_ParseTuple(args, "iiiL|O", &netns_fd, &home_fd, &family, &mark, &cls))
		return NULL;
	if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls,
						   (PyTypeObject *)socket_class)) {
		PyErr_SetString(PyExc_TypeError, "cls must be a subclass of socket.socket");
		return NULL;
	}
	if (mark > UINT32_MAX) {
		PyErr_Format(PyExc_ValueError, "mark %lld does not fit in 32 bits", mark);
		return NULL;
	}
	if (setns(netns_fd, CLONE_NEWNET) < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	PyObject *sock = PyObject_CallFunction(cls, "ii", family,
					       SOCK_STREAM | SOCK_NONBLOCK);
	if (setns(home_fd, CLONE_NEWNET) < 0) {
		dprintf(2, "weir: fatal: cannot leave namespace fd %d: %s\n", netns_fd,
			strerror(errno));
		_exit(70);
	}
	if (sock == NULL || mark < 0)
		return sock;
	int fd = PyObject_AsFileDescriptor(sock);
	unsigned int value = (unsigned int)mark;
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_MARK, &value, sizeof(value)) < 0) {
		if (fd >= 0)
			PyErr_SetFromErrno(PyExc_OSError);
		PyObject *type, *error, *trace;
		PyErr_Fetch(&type, &error, &trace);
		PyObject *closed = PyObject_CallMethod(sock, "close", NULL);
		Py_XDECREF(closed);
		PyErr_Restore(type, error, trace);
		Py_DECREF(sock);
		return NULL;
	}
	return sock;
}

static PyMethodDef methods[] = {
	{ "original_destination_v4", original_destination_v4, METH_O,
	  "(address, port) an IPv4 socket was redirected from; OSError if it was not." },
	{ "socket_in_netns", socket_in_netns, METH_VARARGS,
	  "A non-blocking TCP socket (of class cls) of netns_fd's namespace, marked unless mark < 0." },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_socket_calls", NULL, 0, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__socket_calls(void)
{
	PyObject *socket_module = PyImport_ImportModule("socket");
	if (socket_module == NULL)
		return NULL;
	socket_class = PyObject_GetAttrString(socket_module, "socket");
	Py_DECREF(socket_module);
	if (socket_class == NULL)
		return NULL;
	return PyModule_Create(&module);
}
