/*
 * The HTTP/2 codec's per-stream state, and the per-frame work of the HBONE
 * receive path in C: DATA frames written straight to each stream's TCP
 * socket, with the flow-control bookkeeping that follows each of them.
 *
 * Why C: at saturation the proxy's user time per request was 1.3x Envoy's,
 * three quarters of it the interpreter itself, and each DATA frame of a
 * 1 KiB request cost four Python calls on the receiving side alone (the
 * codec's event, the stream's handler, the TCP write, the acknowledgement).
 * Trimming calls had stopped paying: only taking the bytecode away does.
 *
 * Python stays in charge of everything else. `deliver_data` handles a run
 * of frames that are all the common case (whole, unpadded DATA without
 * END_STREAM, for a stream whose TCP side is attached, within both
 * windows) and stops at the first frame that is not, which the codec's
 * Python then handles: a stream that is ending, one not attached yet, a
 * flow-control fault, any other frame type. What it does per frame is what
 * connection.py's receive loop, hbone.py's HboneStream._on_h2_data,
 * TcpPeer.write_lent and Connection.acknowledge do, in that order;
 * tests/unit/test_http2_fastpath.py holds the two paths to the same results.
 *
 * The other way, a `DataSender` is what the TCP side's transport calls with
 * each read of a stream's TCP side: in the common case (nothing waiting
 * before it, the HTTP/2 connection writable, within both send windows and
 * the peer's frame size) it queues one DATA frame and schedules the
 * connection's flush, as HboneStream.on_data, Connection.try_send_data and
 * H2Protocol.flush do; otherwise it hands the read to TcpPeer.data_received,
 * the Python path, which decides afresh.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#define FRAME_HEADER_SIZE 9
#define TYPE_DATA 0x0
#define TYPE_WINDOW_UPDATE 0x8
#define FLAG_END_STREAM 0x1
#define FLAG_PADDED 0x8
/* pieces.py LARGE: a payload this big is queued as it is, not copied behind its header. */
#define LARGE_PIECE (16 * 1024)

typedef struct {
	PyObject_HEAD
	/* The codec's flow control and state (connection.py). */
	long long send_window;
	long long recv_available;
	long long recv_unacked;
	char local;
	char local_closed;
	char remote_closed;
	char responded;
	/* Where DATA goes without Python: set by the stream's owner once its TCP
	 * side is attached (hbone.py), cleared when it finishes. */
	PyObject *peer;  /* a TcpPeer: its transport, lost and fd */
	PyObject *flow;  /* a Flow: delivered bytes are counted into it */
	char count_down; /* into flow.down (else flow.up) */
	char peer_congested;
	long long held_acks; /* delivered while the TCP side was congested */
} StreamState;

static PyObject *str_transport, *str_lost, *str_fd, *str_up, *str_down, *str_is_closing,
	*str_get_write_buffer_size, *str_write, *str_pending, *str_write_paused, *str_closed,
	*str_flush_pending, *str_remote_max_frame_size, *str_send_window, *str_h2, *str_out,
	*str_loop, *str_call_soon, *str_flush_now, *str_data_received;

static int StreamState_init(StreamState *self, PyObject *args, PyObject *kwargs)
{
	static char *keywords[] = { "local", "send_window", "recv_window", NULL };
	int local = 0;
	long long send_window = 0, recv_window = 0;
	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "pLL", keywords, &local, &send_window,
					 &recv_window))
		return -1;
	self->local = (char)local;
	self->send_window = send_window;
	self->recv_available = recv_window;
	self->recv_unacked = 0;
	self->local_closed = self->remote_closed = self->responded = 0;
	Py_CLEAR(self->peer);
	Py_CLEAR(self->flow);
	self->count_down = self->peer_congested = 0;
	self->held_acks = 0;
	return 0;
}

static int StreamState_traverse(StreamState *self, visitproc visit, void *arg)
{
	Py_VISIT(self->peer);
	Py_VISIT(self->flow);
	return 0;
}

static int StreamState_clear(StreamState *self)
{
	Py_CLEAR(self->peer);
	Py_CLEAR(self->flow);
	return 0;
}

static void StreamState_dealloc(StreamState *self)
{
	PyObject_GC_UnTrack(self);
	StreamState_clear(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef StreamState_members[] = {
	{ "send_window", T_LONGLONG, offsetof(StreamState, send_window), 0, NULL },
	{ "recv_available", T_LONGLONG, offsetof(StreamState, recv_available), 0, NULL },
	{ "recv_unacked", T_LONGLONG, offsetof(StreamState, recv_unacked), 0, NULL },
	{ "local", T_BOOL, offsetof(StreamState, local), 0, NULL },
	{ "local_closed", T_BOOL, offsetof(StreamState, local_closed), 0, NULL },
	{ "remote_closed", T_BOOL, offsetof(StreamState, remote_closed), 0, NULL },
	{ "responded", T_BOOL, offsetof(StreamState, responded), 0, NULL },
	{ "peer", T_OBJECT, offsetof(StreamState, peer), 0, NULL },
	{ "flow", T_OBJECT, offsetof(StreamState, flow), 0, NULL },
	{ "count_down", T_BOOL, offsetof(StreamState, count_down), 0, NULL },
	{ "peer_congested", T_BOOL, offsetof(StreamState, peer_congested), 0, NULL },
	{ "held_acks", T_LONGLONG, offsetof(StreamState, held_acks), 0, NULL },
	{ NULL },
};

static PyTypeObject StreamStateType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "node_agent.proxy.http2._fastpath.StreamState",
	.tp_doc = PyDoc_STR("One HTTP/2 stream's state, and where its DATA may go without Python."),
	.tp_basicsize = sizeof(StreamState),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)StreamState_init,
	.tp_dealloc = (destructor)StreamState_dealloc,
	.tp_traverse = (traverseproc)StreamState_traverse,
	.tp_clear = (inquiry)StreamState_clear,
	.tp_members = StreamState_members,
};

/* The peer's socket fd when DATA can go there from C; -1 to leave the frame to Python
 * (which looks the fd up on its first write), -2 on an error. */
static long peer_fd(PyObject *peer)
{
	PyObject *value = PyObject_GetAttr(peer, str_fd);
	if (value == NULL)
		return -2;
	long fd = PyLong_AsLong(value);
	Py_DECREF(value);
	if (fd == -1 && PyErr_Occurred())
		return -2;
	return fd < 0 ? -1 : fd;
}

/* TcpPeer.write_lent: the socket first, and only what it did not take copied for the
 * transport (which keeps the object it is given; `data` is lent). Nothing when the
 * peer is gone or closing. 0, or -1 with an exception set. */
static int write_lent(PyObject *peer, int fd, const char *data, Py_ssize_t size)
{
	PyObject *transport = PyObject_GetAttr(peer, str_transport);
	if (transport == NULL)
		return -1;
	int result = -1;
	PyObject *value = NULL;
	if (transport == Py_None) {
		result = 0;
		goto done;
	}
	value = PyObject_GetAttr(peer, str_lost);
	if (value == NULL)
		goto done;
	int gone = PyObject_IsTrue(value);
	Py_CLEAR(value);
	if (gone < 0)
		goto done;
	if (!gone) {
		value = PyObject_CallMethodNoArgs(transport, str_is_closing);
		if (value == NULL)
			goto done;
		gone = PyObject_IsTrue(value);
		Py_CLEAR(value);
		if (gone < 0)
			goto done;
	}
	if (gone) {
		result = 0;
		goto done;
	}
	value = PyObject_CallMethodNoArgs(transport, str_get_write_buffer_size);
	if (value == NULL)
		goto done;
	long queued = PyLong_AsLong(value);
	Py_CLEAR(value);
	if (queued == -1 && PyErr_Occurred())
		goto done;
	Py_ssize_t sent = 0;
	if (queued == 0) {
		/* Would block: the rest waits in the transport. Failed: the transport
		 * meets the error itself on its write, and reports it. */
		ssize_t n;
		do {
			n = write(fd, data, (size_t)size);
		} while (n < 0 && errno == EINTR);
		if (n > 0)
			sent = n;
	}
	if (sent < size) {
		PyObject *rest = PyBytes_FromStringAndSize(data + sent, size - sent);
		if (rest == NULL)
			goto done;
		value = PyObject_CallMethodOneArg(transport, str_write, rest);
		Py_DECREF(rest);
		if (value == NULL)
			goto done;
		Py_CLEAR(value);
	}
	result = 0;
done:
	Py_DECREF(transport);
	return result;
}

/* Adds `size` to the stream's flow.down if `down`, else to its flow.up. */
static int count_into_flow(StreamState *stream, int down, Py_ssize_t size)
{
	if (stream->flow == NULL || stream->flow == Py_None)
		return 0;
	PyObject *name = down ? str_down : str_up;
	PyObject *old = PyObject_GetAttr(stream->flow, name);
	if (old == NULL)
		return -1;
	PyObject *delta = PyLong_FromSsize_t(size);
	if (delta == NULL) {
		Py_DECREF(old);
		return -1;
	}
	PyObject *sum = PyNumber_Add(old, delta);
	Py_DECREF(old);
	Py_DECREF(delta);
	if (sum == NULL)
		return -1;
	int result = PyObject_SetAttr(stream->flow, name, sum);
	Py_DECREF(sum);
	return result;
}

static int queue_window_update(PyObject *out, uint32_t stream_id, long long increment)
{
	unsigned char frame[FRAME_HEADER_SIZE + 4] = {
		0, 0, 4, TYPE_WINDOW_UPDATE, 0,
		(unsigned char)(stream_id >> 24), (unsigned char)(stream_id >> 16),
		(unsigned char)(stream_id >> 8), (unsigned char)stream_id,
		(unsigned char)(increment >> 24), (unsigned char)(increment >> 16),
		(unsigned char)(increment >> 8), (unsigned char)increment,
	};
	PyObject *bytes = PyBytes_FromStringAndSize((const char *)frame, sizeof(frame));
	if (bytes == NULL)
		return -1;
	int result = PyList_Append(out, bytes);
	Py_DECREF(bytes);
	return result;
}

PyDoc_STRVAR(deliver_data_doc,
	     "deliver_data(data, pos, streams, recv_available, recv_unacked, connection_threshold,\n"
	     "             stream_threshold, max_frame_size, out) -> (pos, recv_available, recv_unacked)\n"
	     "\n"
	     "Deliver the run of common-case DATA frames starting at `pos` in `data` to their\n"
	     "streams' TCP sides, account them in the connection's and the streams' receive\n"
	     "windows, and queue the window updates due onto `out`. Stops at the first frame\n"
	     "that is not the common case, or that is not whole in `data`: where it stopped,\n"
	     "and the connection's receive window after it, are returned.");

static PyObject *deliver_data(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
	(void)module;
	if (nargs != 9) {
		PyErr_Format(PyExc_TypeError, "deliver_data takes 9 arguments, not %zd", nargs);
		return NULL;
	}
	PyObject *streams = args[2], *out = args[8];
	if (!PyDict_Check(streams) || !PyList_Check(out)) {
		PyErr_SetString(PyExc_TypeError, "deliver_data: streams must be a dict, out a list");
		return NULL;
	}
	Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
	long long recv_available = PyLong_AsLongLong(args[3]);
	long long recv_unacked = PyLong_AsLongLong(args[4]);
	long long connection_threshold = PyLong_AsLongLong(args[5]);
	long long stream_threshold = PyLong_AsLongLong(args[6]);
	long long max_frame_size = PyLong_AsLongLong(args[7]);
	if (PyErr_Occurred())
		return NULL;
	Py_buffer view;
	if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
		return NULL;
	const unsigned char *buffer = view.buf;
	Py_ssize_t end = view.len;
	if (pos < 0 || pos > end) {
		PyBuffer_Release(&view);
		PyErr_SetString(PyExc_ValueError, "deliver_data: pos outside the data");
		return NULL;
	}
	while (end - pos >= FRAME_HEADER_SIZE) {
		const unsigned char *header = buffer + pos;
		long long length = (long long)header[0] << 16 | header[1] << 8 | header[2];
		uint32_t stream_id = ((uint32_t)header[5] << 24 | (uint32_t)header[6] << 16 |
				      (uint32_t)header[7] << 8 | header[8]) & 0x7fffffffU;
		if (header[3] != TYPE_DATA || header[4] & (FLAG_PADDED | FLAG_END_STREAM) ||
		    length == 0 || length > max_frame_size ||
		    end - pos - FRAME_HEADER_SIZE < length || length > recv_available)
			break;
		PyObject *key = PyLong_FromUnsignedLong(stream_id);
		if (key == NULL)
			goto error;
		PyObject *found = PyDict_GetItemWithError(streams, key);
		if (found == NULL || !Py_IS_TYPE(found, &StreamStateType)) {
			Py_DECREF(key);
			if (PyErr_Occurred())
				goto error;
			break;
		}
		StreamState *stream = (StreamState *)found;
		if (stream->remote_closed || length > stream->recv_available ||
		    stream->peer == NULL || stream->peer == Py_None) {
			Py_DECREF(key);
			break;
		}
		long fd = peer_fd(stream->peer);
		if (fd < 0) {
			Py_DECREF(key);
			if (fd == -2)
				goto error;
			break;
		}
		/* What follows may run Python (the transport's write, its pause_writing),
		 * which may forget the stream: keep it, and the peer it writes to. */
		Py_INCREF(stream);
		PyObject *peer = stream->peer;
		Py_INCREF(peer);
		recv_available -= length;
		stream->recv_available -= length;
		const char *payload = (const char *)header + FRAME_HEADER_SIZE;
		int failed = count_into_flow(stream, stream->count_down, (Py_ssize_t)length) < 0 ||
			     write_lent(peer, (int)fd, payload, (Py_ssize_t)length) < 0;
		Py_DECREF(peer);
		if (!failed && stream->peer_congested) {
			stream->held_acks += length; /* handed back once the TCP side drains */
		} else if (!failed) {
			recv_unacked += length;
			if (recv_unacked >= connection_threshold) {
				failed = queue_window_update(out, 0, recv_unacked) < 0;
				recv_available += recv_unacked;
				recv_unacked = 0;
			}
			/* Only while the codec still has it: a stream forgotten meanwhile
			 * gets no window back, as Connection.acknowledge would do. */
			if (!failed && !stream->remote_closed &&
			    PyDict_GetItemWithError(streams, key) == (PyObject *)stream) {
				stream->recv_unacked += length;
				if (stream->recv_unacked >= stream_threshold) {
					failed = queue_window_update(out, stream_id,
								     stream->recv_unacked) < 0;
					stream->recv_available += stream->recv_unacked;
					stream->recv_unacked = 0;
				}
			} else if (!failed && PyErr_Occurred()) {
				failed = 1;
			}
		}
		Py_DECREF(stream);
		Py_DECREF(key);
		if (failed)
			goto error;
		pos += FRAME_HEADER_SIZE + (Py_ssize_t)length;
	}
	PyBuffer_Release(&view);
	return Py_BuildValue("nLL", pos, recv_available, recv_unacked);
error:
	PyBuffer_Release(&view);
	return NULL;
}

/* -- TCP to HTTP/2 ------------------------------------------------------------------ */

typedef struct {
	PyObject_HEAD
	vectorcallfunc vectorcall;
	StreamState *state;
	uint32_t stream_id;
	PyObject *peer;      /* the TcpPeer whose reads these are */
	PyObject *fallback;  /* its class's data_received: the Python path */
	PyObject *stream;    /* the HboneStream: what waits in its _pending */
	PyObject *protocol;  /* the H2Protocol: write_paused, closed, _flush_pending */
	PyObject *codec;     /* its Connection: remote_max_frame_size, _send_window */
	PyObject *out;       /* the codec's output list */
	PyObject *call_soon; /* the loop's */
	PyObject *flush_now; /* the protocol's _flush_now */
} DataSender;

static int DataSender_traverse(DataSender *self, visitproc visit, void *arg)
{
	Py_VISIT(self->state);
	Py_VISIT(self->peer);
	Py_VISIT(self->fallback);
	Py_VISIT(self->stream);
	Py_VISIT(self->protocol);
	Py_VISIT(self->codec);
	Py_VISIT(self->out);
	Py_VISIT(self->call_soon);
	Py_VISIT(self->flush_now);
	return 0;
}

static int DataSender_clear(DataSender *self)
{
	Py_CLEAR(self->state);
	Py_CLEAR(self->peer);
	Py_CLEAR(self->fallback);
	Py_CLEAR(self->stream);
	Py_CLEAR(self->protocol);
	Py_CLEAR(self->codec);
	Py_CLEAR(self->out);
	Py_CLEAR(self->call_soon);
	Py_CLEAR(self->flush_now);
	return 0;
}

static void DataSender_dealloc(DataSender *self)
{
	PyObject_GC_UnTrack(self);
	DataSender_clear(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* 1 if the attribute is true, 0 if not, -1 on an error. */
static int attribute_true(PyObject *object, PyObject *name)
{
	PyObject *value = PyObject_GetAttr(object, name);
	if (value == NULL)
		return -1;
	int result = PyObject_IsTrue(value);
	Py_DECREF(value);
	return result;
}

static int attribute_long_long(PyObject *object, PyObject *name, long long *result)
{
	PyObject *value = PyObject_GetAttr(object, name);
	if (value == NULL)
		return -1;
	*result = PyLong_AsLongLong(value);
	Py_DECREF(value);
	return *result == -1 && PyErr_Occurred() ? -1 : 0;
}

/* Whether `size` bytes can go as one DATA frame now, as HboneStream.on_data and
 * Connection.try_send_data decide: 1 yes (with the connection's send window in
 * *window), 0 no, -1 on an error. */
static int sendable(DataSender *self, Py_ssize_t size, long long *window)
{
	StreamState *state = self->state;
	if (size == 0 || state->peer == NULL || state->peer == Py_None || state->local_closed ||
	    size > state->send_window)
		return 0;
	PyObject *pending = PyObject_GetAttr(self->stream, str_pending);
	if (pending == NULL)
		return -1;
	Py_ssize_t waiting = PyObject_Length(pending);
	Py_DECREF(pending);
	if (waiting != 0)
		return waiting < 0 ? -1 : 0;
	int blocked = attribute_true(self->protocol, str_write_paused);
	if (blocked == 0)
		blocked = attribute_true(self->protocol, str_closed);
	if (blocked != 0)
		return blocked < 0 ? -1 : 0;
	long long max_frame_size;
	if (attribute_long_long(self->codec, str_remote_max_frame_size, &max_frame_size) < 0 ||
	    attribute_long_long(self->codec, str_send_window, window) < 0)
		return -1;
	return size <= max_frame_size && size <= *window;
}

static int queue_data_frame(DataSender *self, PyObject *data, Py_ssize_t size)
{
	uint32_t id = self->stream_id;
	unsigned char header[FRAME_HEADER_SIZE] = {
		(unsigned char)(size >> 16), (unsigned char)(size >> 8), (unsigned char)size,
		TYPE_DATA, 0,
		(unsigned char)(id >> 24), (unsigned char)(id >> 16), (unsigned char)(id >> 8),
		(unsigned char)id,
	};
	if (size >= LARGE_PIECE) {
		PyObject *head = PyBytes_FromStringAndSize((const char *)header, FRAME_HEADER_SIZE);
		if (head == NULL)
			return -1;
		int result = PyList_Append(self->out, head);
		Py_DECREF(head);
		return result < 0 ? -1 : PyList_Append(self->out, data);
	}
	/* One piece with its header: the TLS layer makes a record per write. */
	PyObject *frame = PyBytes_FromStringAndSize(NULL, FRAME_HEADER_SIZE + size);
	if (frame == NULL)
		return -1;
	memcpy(PyBytes_AS_STRING(frame), header, FRAME_HEADER_SIZE);
	memcpy(PyBytes_AS_STRING(frame) + FRAME_HEADER_SIZE, PyBytes_AS_STRING(data),
	       (size_t)size);
	int result = PyList_Append(self->out, frame);
	Py_DECREF(frame);
	return result;
}

/* H2Protocol.flush: the connection's output goes out once, two loop passes from now
 * (H2Protocol._flush_now says why). */
static int schedule_flush(DataSender *self)
{
	int pending = attribute_true(self->protocol, str_flush_pending);
	if (pending != 0)
		return pending < 0 ? -1 : 0;
	if (PyObject_SetAttr(self->protocol, str_flush_pending, Py_True) < 0)
		return -1;
	PyObject *handle = PyObject_CallOneArg(self->call_soon, self->flush_now);
	if (handle == NULL)
		return -1;
	Py_DECREF(handle);
	return 0;
}

static PyObject *DataSender_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
				       PyObject *kwnames)
{
	DataSender *self = (DataSender *)callable;
	if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
		PyErr_SetString(PyExc_TypeError, "a DataSender takes one argument, the bytes read");
		return NULL;
	}
	PyObject *data = args[0];
	long long window = 0;
	Py_ssize_t size = PyBytes_Check(data) ? PyBytes_GET_SIZE(data) : 0;
	int fast = size ? sendable(self, size, &window) : 0;
	if (fast < 0)
		return NULL;
	if (!fast)
		return PyObject_CallFunctionObjArgs(self->fallback, self->peer, data, NULL);
	StreamState *state = self->state;
	/* On the side where the TCP side opened the connection, its bytes go up. */
	if (count_into_flow(state, !state->count_down, size) < 0)
		return NULL;
	PyObject *left = PyLong_FromLongLong(window - size);
	if (left == NULL)
		return NULL;
	int failed = PyObject_SetAttr(self->codec, str_send_window, left);
	Py_DECREF(left);
	if (failed < 0)
		return NULL;
	state->send_window -= size;
	if (queue_data_frame(self, data, size) < 0 || schedule_flush(self) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *DataSender_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
	static char *keywords[] = { "state", "stream_id", "peer", "stream", "protocol", NULL };
	PyObject *state, *peer, *stream, *protocol;
	unsigned long stream_id;
	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!kOOO", keywords, &StreamStateType,
					 &state, &stream_id, &peer, &stream, &protocol))
		return NULL;
	if (stream_id == 0 || stream_id > 0x7fffffffUL) {
		PyErr_SetString(PyExc_ValueError, "DataSender: not a stream id");
		return NULL;
	}
	DataSender *self = (DataSender *)type->tp_alloc(type, 0);
	if (self == NULL)
		return NULL;
	self->vectorcall = DataSender_vectorcall;
	self->stream_id = (uint32_t)stream_id;
	Py_INCREF(state);
	self->state = (StreamState *)state;
	Py_INCREF(peer);
	self->peer = peer;
	Py_INCREF(stream);
	self->stream = stream;
	Py_INCREF(protocol);
	self->protocol = protocol;
	PyObject *loop = NULL;
	self->fallback = PyObject_GetAttr((PyObject *)Py_TYPE(peer), str_data_received);
	if (self->fallback == NULL)
		goto error;
	self->codec = PyObject_GetAttr(protocol, str_h2);
	if (self->codec == NULL)
		goto error;
	self->out = PyObject_GetAttr(self->codec, str_out);
	if (self->out == NULL)
		goto error;
	if (!PyList_Check(self->out)) {
		PyErr_SetString(PyExc_TypeError, "DataSender: the codec's output is not a list");
		goto error;
	}
	self->flush_now = PyObject_GetAttr(protocol, str_flush_now);
	if (self->flush_now == NULL)
		goto error;
	loop = PyObject_GetAttr(protocol, str_loop);
	if (loop == NULL)
		goto error;
	self->call_soon = PyObject_GetAttr(loop, str_call_soon);
	Py_DECREF(loop);
	if (self->call_soon == NULL)
		goto error;
	return (PyObject *)self;
error:
	Py_DECREF(self);
	return NULL;
}

static PyTypeObject DataSenderType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "node_agent.proxy.http2._fastpath.DataSender",
	.tp_doc = PyDoc_STR("DataSender(state, stream_id, peer, stream, protocol): called with "
			    "each read of a stream's TCP side, sends it as DATA when it can."),
	.tp_basicsize = sizeof(DataSender),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
	.tp_new = DataSender_new,
	.tp_dealloc = (destructor)DataSender_dealloc,
	.tp_traverse = (traverseproc)DataSender_traverse,
	.tp_clear = (inquiry)DataSender_clear,
	.tp_call = PyVectorcall_Call,
	.tp_vectorcall_offset = offsetof(DataSender, vectorcall),
};

static PyMethodDef fastpath_methods[] = {
	{ "deliver_data", (PyCFunction)(void (*)(void))deliver_data, METH_FASTCALL,
	  deliver_data_doc },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef fastpath_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "node_agent.proxy.http2._fastpath",
	.m_doc = PyDoc_STR("The HTTP/2 codec's per-stream state and its DATA receive path, in C."),
	.m_size = -1,
	.m_methods = fastpath_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
	struct {
		PyObject **slot;
		const char *text;
	} names[] = {
		{ &str_transport, "transport" },
		{ &str_lost, "lost" },
		{ &str_fd, "fd" },
		{ &str_up, "up" },
		{ &str_down, "down" },
		{ &str_is_closing, "is_closing" },
		{ &str_get_write_buffer_size, "get_write_buffer_size" },
		{ &str_write, "write" },
		{ &str_pending, "_pending" },
		{ &str_write_paused, "write_paused" },
		{ &str_closed, "closed" },
		{ &str_flush_pending, "_flush_pending" },
		{ &str_remote_max_frame_size, "remote_max_frame_size" },
		{ &str_send_window, "_send_window" },
		{ &str_h2, "h2" },
		{ &str_out, "_out" },
		{ &str_loop, "loop" },
		{ &str_call_soon, "call_soon" },
		{ &str_flush_now, "_flush_now" },
		{ &str_data_received, "data_received" },
	};
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		*names[i].slot = PyUnicode_InternFromString(names[i].text);
		if (*names[i].slot == NULL)
			return NULL;
	}
	if (PyType_Ready(&StreamStateType) < 0 || PyType_Ready(&DataSenderType) < 0)
		return NULL;
	PyObject *module = PyModule_Create(&fastpath_module);
	if (module == NULL)
		return NULL;
	if (PyModule_AddObjectRef(module, "StreamState", (PyObject *)&StreamStateType) < 0 ||
	    PyModule_AddObjectRef(module, "DataSender", (PyObject *)&DataSenderType) < 0) {
		Py_DECREF(module);
		return NULL;
	}
	return module;
}
