/*
 * The two socket calls every proxied connection makes, without the Python
 * objects around them.
 *
 * Why C: at new-connection saturation each connection cost the two proxies
 * 1.3x Envoy's CPU, spread over the interpreter. These two calls were the
 * costliest leaves of it that are pure overhead: in Python, asking where a
 * captured connection was going built a socket object around uvloop's
 * socket for one getsockopt(2) (socket.py's constructor, a getsockname(2),
 * detach), and an upstream socket in a pod cost two ctypes calls for
 * setns(2), the socket object, and a setsockopt call.
 *
 * original_destination_v4(fd) answers SO_ORIGINAL_DST for an IPv4 socket;
 * IPv6 stays in original_dst.py (rare, and its address text must match the
 * ipaddress module's, which inet_ntop's does not always).
 * socket_in_netns(netns_fd, home_fd, family, mark) makes a non-blocking
 * TCP socket of netns_fd's namespace, marked, and returns its fd; the
 * thread goes back to home_fd before anything else, and if the kernel
 * refuses that the process ends (as node_agent.netns does), because a
 * thread left inside a pod would make every later socket there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* linux/netfilter_ipv4.h, answered by conntrack (iptables REDIRECT) and by
 * Weir's cgroup/getsockopt program (eBPF capture) alike. */
#define SO_ORIGINAL_DST 80

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
	if (inet_ntop(AF_INET, &address.sin_addr, text, sizeof(text)) == NULL)
		return PyErr_SetFromErrno(PyExc_OSError);
	return Py_BuildValue("(si)", text, (int)ntohs(address.sin_port));
}

static PyObject *socket_in_netns(PyObject *module, PyObject *args)
{
	(void)module;
	int netns_fd, home_fd, family;
	long long mark;
	if (!PyArg_ParseTuple(args, "iiiL", &netns_fd, &home_fd, &family, &mark))
		return NULL;
	if (setns(netns_fd, CLONE_NEWNET) < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	int saved = errno;
	if (setns(home_fd, CLONE_NEWNET) < 0) {
		dprintf(2, "weir: fatal: cannot leave namespace fd %d: %s\n", netns_fd,
			strerror(errno));
		_exit(70);
	}
	if (fd < 0) {
		errno = saved;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	if (mark >= 0) {
		unsigned int value = (unsigned int)mark;
		if (setsockopt(fd, SOL_SOCKET, SO_MARK, &value, sizeof(value)) < 0) {
			saved = errno;
			close(fd);
			errno = saved;
			return PyErr_SetFromErrno(PyExc_OSError);
		}
	}
	return PyLong_FromLong(fd);
}

static PyMethodDef methods[] = {
	{ "original_destination_v4", original_destination_v4, METH_O,
	  "(address, port) an IPv4 socket was redirected from; OSError if it was not." },
	{ "socket_in_netns", socket_in_netns, METH_VARARGS,
	  "fd of a non-blocking TCP socket of netns_fd's namespace, marked unless mark < 0." },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_socket_calls", NULL, 0, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__socket_calls(void)
{
	return PyModule_Create(&module);
}
