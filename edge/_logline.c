/* edge._logline: the access-log line of an ordinary request, made in C (issue 6).
 *
 * edge/accesslog.py `LineFormatter.format_in_python` is the format's reference and handles
 * every exchange; this module makes the same bytes for the common case, a routed request whose
 * head is all ASCII, in one call and without bytecode (~3.6k instructions; a line in Python
 * costs ~12.5k, more than 10 % of a small hit's). Whatever it does not handle (a refused or
 * unrouted request, a non-ASCII head, a Content-Type the formatter has not seen yet, a value
 * out of the ranges below) it hands to the Python method, so both paths make identical bytes
 * (tests/unit/test_logline.py compares them).
 *
 *     LineMaker(edge, unknown_domain, content_types, fallback, head_type)
 *     LineMaker.format(end, end_mono, exchange) -> (directory, hour, line)
 *
 * `content_types` is the formatter's memo (response header block -> Content-Type text or
 * None); `fallback(end, end_mono, exchange)` is the Python method; `head_type` is
 * edge.http1.RequestHead.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <float.h>
#include <math.h>
#include <string.h>
#include <time.h>

/* The durations must be the Python path's to the digit: double arithmetic, no wider. */
#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "edge._logline needs plain double arithmetic (SSE2); the edge makes its lines in Python"
#endif

/* Attribute names, interned once. */
static PyObject *s_started, *s_head_at, *s_client_ip, *s_domain, *s_head, *s_status,
    *s_bytes_sent, *s_body_bytes_sent, *s_outcome, *s_response_head, *s_origin_status,
    *s_origin_ms, *s_ascii, *s_headers, *s_method, *s_target, *s_received_target, *s_version,
    *s_range, *s_referer, *s_user_agent;

/* --- writing a line: one buffer reserved for the longest the values can make ------------- */

typedef struct {
    char *p;
    char stack[2048];
} Buf;

/* Room for `size` bytes: on the stack for a line of usual size, on the heap past it. */
static char *buf_open(Buf *b, size_t size) {
    b->p = size <= sizeof b->stack ? b->stack : PyMem_Malloc(size);
    if (b->p == NULL) PyErr_NoMemory();
    return b->p;
}

static void buf_close(Buf *b) {
    if (b->p != b->stack) PyMem_Free(b->p);
}

#define LIT(o, s) (memcpy((o), (s), sizeof(s) - 1), (o) + sizeof(s) - 1)

/* A JSON string of ASCII bytes, escaped as orjson escapes them (the Python path's fast case):
 * quote and backslash, \b \t \n \f \r, other control characters as \u00xx; DEL as it is.
 * Room for 6 bytes per byte and 2; NULL if a byte is not ASCII (the Python path's line). */
static char *put_json_ascii(char *o, const unsigned char *s, Py_ssize_t n) {
    static const char hex[] = "0123456789abcdef";
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            if (c >= 0x80) return NULL;
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\t': *o++ = 't'; break;
        case '\n': *o++ = 'n'; break;
        case '\f': *o++ = 'f'; break;
        case '\r': *o++ = 'r'; break;
        default:
            *o++ = 'u'; *o++ = '0'; *o++ = '0';
            *o++ = hex[c >> 4]; *o++ = hex[c & 15];
        }
    }
    *o++ = '"';
    return o;
}

/* Longer strings are the Python path's: a line's size bound never overflows. */
#define TEXT_MAX (PY_SSIZE_T_MAX / 64)

/* A str field already checked by `text_size`: null for None. */
static char *put_text(char *o, PyObject *v) {
    if (v == Py_None) return LIT(o, "null");
    return put_json_ascii(o, PyUnicode_DATA(v), PyUnicode_GET_LENGTH(v));
}

/* The room `put_text` needs for `v`; -1 if it is not None or an ASCII str. */
static Py_ssize_t text_size(PyObject *v) {
    if (v == Py_None) return 4;
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v)) return -1;
    if (PyUnicode_GET_LENGTH(v) > TEXT_MAX) return -1;
    return PyUnicode_GET_LENGTH(v) * 6 + 2;
}

/* Decimal digits of n (at most 20 bytes, a sign included). */
static char *put_digits(char *o, long long n) {
    char digits[24];
    char *d = digits + sizeof digits;
    unsigned long long u = n < 0 ? 0ULL - (unsigned long long)n : (unsigned long long)n;
    do {
        *--d = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (n < 0) *--d = '-';
    size_t len = (size_t)(digits + sizeof digits - d);
    memcpy(o, d, len);
    return o + len;
}

/* An int field: null for None; 0 if `v` is neither None nor an int within 64 bits. */
static int int_value(PyObject *v, long long *n, int *null) {
    *null = v == Py_None;
    if (*null) return 1;
    if (!PyLong_CheckExact(v)) return 0;
    int overflow;
    *n = PyLong_AsLongLongAndOverflow(v, &overflow);
    return !overflow;
}

static char *put_int(char *o, long long n, int null) {
    return null ? LIT(o, "null") : put_digits(o, n);
}

/* Microseconds `us` as the float us / 1e3 prints (repr): for a whole number of microseconds
 * below 1e15 that is the exact decimal with trailing zeros off ("0.412", "5.0"). */
static char *put_ms(char *o, long long us) {
    o = put_digits(o, us / 1000);
    *o++ = '.';
    int frac = (int)(us % 1000);
    *o++ = (char)('0' + frac / 100);
    if (frac % 100) {
        *o++ = (char)('0' + frac / 10 % 10);
        if (frac % 10) *o++ = (char)('0' + frac % 10);
    }
    return o;
}

/* A duration in the Python path's arithmetic, `x // 1.0` of microseconds: 0 if out of the
 * range `put_ms` prints like repr (negative, -0.0, or 1e15 µs and more: the Python path's). */
static int micros(double x, long long *us) {
    double whole = floor(x);
    if (!(whole >= 0.0 && whole < 1e15) || signbit(whole)) return 0; /* -0.0 prints "-0.0" */
    *us = (long long)whole;
    return 1;
}

#define TIME_LEN 29

/* --- LineMaker ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *edge;           /* str, ASCII (else every line takes the Python path) */
    PyObject *unknown_domain; /* str */
    PyObject *content_types;  /* dict: header block -> str | None */
    PyObject *fallback;       /* the Python method; NULL: not initialised */
    PyTypeObject *head_type;  /* edge.http1.RequestHead: other heads are the Python path's */
    int edge_ascii;
    double ms;                /* the millisecond `time_text` is of (floor of end * 1e3) */
    long long second;         /* the second of `time_text`'s date and time */
    PyObject *hour;           /* "YYYY-MM-DDTHH" (str) of `second`, or NULL */
    char time_text[TIME_LEN]; /* "YYYY-MM-DDTHH:MM:SS.mmm+00:00" */
} LineMaker;

static int maker_traverse(LineMaker *self, visitproc visit, void *arg) {
    Py_VISIT(self->edge);
    Py_VISIT(self->unknown_domain);
    Py_VISIT(self->content_types);
    Py_VISIT(self->fallback);
    Py_VISIT(self->head_type);
    Py_VISIT(self->hour);
    return 0;
}

static int maker_clear(LineMaker *self) {
    Py_CLEAR(self->edge);
    Py_CLEAR(self->unknown_domain);
    Py_CLEAR(self->content_types);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->head_type);
    Py_CLEAR(self->hour);
    return 0;
}

static void maker_dealloc(LineMaker *self) {
    PyObject_GC_UnTrack(self);
    maker_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int maker_init(LineMaker *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"edge", "unknown_domain", "content_types", "fallback", "head_type",
                            NULL};
    PyObject *edge, *unknown, *types, *fallback, *head_type;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UUO!OO!:LineMaker", names, &edge, &unknown,
                                     &PyDict_Type, &types, &fallback, &PyType_Type, &head_type))
        return -1;
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "LineMaker: fallback must be callable");
        return -1;
    }
    /* Once only: a line being made (a finalizer may run meanwhile) uses these borrowed. */
    if (self->fallback != NULL) {
        PyErr_SetString(PyExc_TypeError, "LineMaker: already initialised");
        return -1;
    }
    self->edge = Py_NewRef(edge);
    self->unknown_domain = Py_NewRef(unknown);
    self->content_types = Py_NewRef(types);
    self->fallback = Py_NewRef(fallback);
    self->head_type = (PyTypeObject *)Py_NewRef(head_type);
    self->edge_ascii = PyUnicode_IS_ASCII(edge);
    self->ms = -1.0;
    self->second = -1;
    return 0;
}

static void put2(char *o, int n) {
    o[0] = (char)('0' + n / 10);
    o[1] = (char)('0' + n % 10);
}

/* time_text and hour for `end` (wall clock s), as LineFormatter.stamp makes them: the date and
 * time once a second, the milliseconds' digits otherwise. 1 if `end` is out of range (the
 * Python path's), -1 on error. */
static int maker_stamp(LineMaker *self, double end) {
    double ms = floor(end * 1e3);
    if (ms == self->ms) return 0;
    if (!(ms >= 0.0 && ms < 253402300800000.0)) return 1; /* before 1970 or past 9999 */
    long long whole = (long long)ms;
    long long second = whole / 1000;
    char *t = self->time_text; /* "YYYY-MM-DDTHH:MM:SS.mmm+00:00" */
    if (second != self->second) {
        time_t at = (time_t)second;
        struct tm tm;
        if ((long long)at != second || gmtime_r(&at, &tm) == NULL) return 1;
        long long was = self->second;
        self->second = -1; /* until the text is whole again */
        self->ms = -1.0;
        put2(t, (tm.tm_year + 1900) / 100);
        put2(t + 2, (tm.tm_year + 1900) % 100);
        t[4] = '-';
        put2(t + 5, tm.tm_mon + 1);
        t[7] = '-';
        put2(t + 8, tm.tm_mday);
        t[10] = 'T';
        put2(t + 11, tm.tm_hour);
        t[13] = ':';
        put2(t + 14, tm.tm_min);
        t[16] = ':';
        put2(t + 17, tm.tm_sec);
        memcpy(t + 19, ".000+00:00", 10);
        if (self->hour == NULL || was < 0 || second / 3600 != was / 3600) {
            PyObject *hour = PyUnicode_FromStringAndSize(t, 13);
            if (hour == NULL) return -1;
            Py_XSETREF(self->hour, hour);
        }
        self->second = second;
    }
    int milli = (int)(whole % 1000);
    t[20] = (char)('0' + milli / 100);
    put2(t + 21, milli % 100);
    self->ms = ms;
    return 0;
}

/* The exchange's values this module reads, and its request head's. */
enum {
    X_STARTED, X_HEAD_AT, X_CLIENT_IP, X_DOMAIN, X_HEAD, X_STATUS, X_BYTES_SENT,
    X_BODY_BYTES_SENT, X_OUTCOME, X_RESPONSE_HEAD, X_ORIGIN_STATUS, X_ORIGIN_MS, N_EXCHANGE
};
enum { H_ASCII, H_HEADERS, H_METHOD, H_TARGET, H_RECEIVED_TARGET, H_VERSION, N_HEAD };

static PyObject **const exchange_names[N_EXCHANGE] = {
    &s_started, &s_head_at, &s_client_ip, &s_domain, &s_head, &s_status, &s_bytes_sent,
    &s_body_bytes_sent, &s_outcome, &s_response_head, &s_origin_status, &s_origin_ms};
static PyObject **const head_names[N_HEAD] = {
    &s_ascii, &s_headers, &s_method, &s_target, &s_received_target, &s_version};

/* Where a class with __slots__ keeps the attributes: the exchange (edge.server.Exchange) and
 * its head (a slots dataclass) are read at these offsets rather than through getattr, which
 * cost more than the rest of the line. Any other class (a refused request's `Ended`) is read
 * through getattr. */
typedef struct {
    PyTypeObject *type;   /* a strong reference; NULL: none yet */
    unsigned int version; /* type->tp_version_tag when learned: a class changed is relearned */
    int slotted;          /* every name is a plain slot of `type` */
    Py_ssize_t offsets[N_EXCHANGE];
} Layout;

static Layout exchange_layout, head_layout;

static void layout_learn(Layout *layout, PyTypeObject *type, PyObject **const names[], int n) {
    Py_INCREF(type);
    Py_XSETREF(layout->type, type);
    layout->slotted = type->tp_getattro == PyObject_GenericGetAttr;
    for (int i = 0; i < n && layout->slotted; i++) {
        PyObject *descr = _PyType_Lookup(type, *names[i]); /* borrowed; never raises */
        /* A member of `type` itself or a base: getattr refuses another class's slots. */
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)
            || !PyType_IsSubtype(type, PyDescr_TYPE(descr))) {
            layout->slotted = 0;
            break;
        }
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != T_OBJECT_EX || (member->flags & READ_RESTRICTED)) {
            layout->slotted = 0;
            break;
        }
        layout->offsets[i] = member->offset;
    }
    /* The tag the lookups left: any change to the class (or a base) invalidates it. */
    layout->version = type->tp_version_tag;
    if (!(type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)) layout->slotted = 0;
}

/* `obj`'s attributes `names` into `out` (new references): 0 done, 1 one is missing (the
 * Python path's), -1 error. */
static int read_values(Layout *layout, PyObject *obj, PyObject **const names[], int n,
                       PyObject **out) {
    PyTypeObject *type = Py_TYPE(obj);
    if (layout->type != type || !(type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)
        || type->tp_version_tag != layout->version)
        layout_learn(layout, type, names, n);
    if (layout->slotted) {
        for (int i = 0; i < n; i++) {
            PyObject *value = *(PyObject **)((char *)obj + layout->offsets[i]);
            if (value == NULL) return 1; /* a slot never set */
            Py_INCREF(value);
            out[i] = value;
        }
        return 0;
    }
    for (int i = 0; i < n; i++) {
        out[i] = PyObject_GetAttr(obj, *names[i]);
        if (out[i] == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
            PyErr_Clear();
            return 1;
        }
    }
    return 0;
}

/* What the line needs from dicts: the response's Content-Type (from the formatter's memo) and
 * three request fields, as new references (a lookup may run Python code, a key's __eq__,
 * which could free what an earlier one found): 0 done, 1 the Python path's, -1 error. */
enum { D_CONTENT_TYPE, D_RANGE, D_REFERER, D_AGENT, N_LOOKED };

static int look_up(LineMaker *self, PyObject **x, PyObject **h, PyObject **d) {
    PyObject *response_head = x[X_RESPONSE_HEAD], *headers = h[H_HEADERS];
    if (!PyBytes_CheckExact(response_head) || !PyDict_CheckExact(headers)) return 1;
    PyObject *found = PyDict_GetItemWithError(self->content_types, response_head);
    if (found == NULL) return PyErr_Occurred() ? -1 : 1; /* not seen yet: Python finds it */
    d[D_CONTENT_TYPE] = Py_NewRef(found);
    PyObject *const fields[] = {s_range, s_referer, s_user_agent};
    for (int i = 0; i < 3; i++) {
        found = PyDict_GetItemWithError(headers, fields[i]);
        if (found == NULL && PyErr_Occurred()) return -1;
        d[D_RANGE + i] = Py_NewRef(found != NULL ? found : Py_None);
    }
    return 0;
}

/* The line of an exchange whose values are `x`, its head's `h` and the looked-up `d`, as a
 * new bytes object, and its hour into `*hour` (a new reference); NULL with no error set: the
 * line is the Python path's. */
static PyObject *make_line(LineMaker *self, double end, double end_mono, PyObject **x,
                           PyObject **h, PyObject **d, PyObject **hour) {
    if (!self->edge_ascii || h[H_ASCII] != Py_True) return NULL;
    PyObject *started = x[X_STARTED], *head_at = x[X_HEAD_AT], *origin_ms = x[X_ORIGIN_MS];
    if (!PyFloat_CheckExact(started) || !PyFloat_CheckExact(head_at)) return NULL;
    double start = PyFloat_AS_DOUBLE(started), head_s = PyFloat_AS_DOUBLE(head_at);
    long long request_us, ttfb_us = 0, origin_us = 0;
    if (!micros((end_mono - start) * 1e6, &request_us)) return NULL;
    if (head_s != 0.0 && !micros((head_s - start) * 1e6, &ttfb_us)) return NULL;
    if (origin_ms != Py_None) {
        if (!PyFloat_CheckExact(origin_ms)) return NULL;
        if (!micros(PyFloat_AS_DOUBLE(origin_ms) * 1e3, &origin_us)) return NULL;
    }
    long long status, sent, body, origin_status;
    int null, origin_null;
    if (!int_value(x[X_STATUS], &status, &null) || null) return NULL;
    if (!int_value(x[X_BYTES_SENT], &sent, &null) || null) return NULL;
    if (!int_value(x[X_BODY_BYTES_SENT], &body, &null) || null) return NULL;
    if (!int_value(x[X_ORIGIN_STATUS], &origin_status, &origin_null)) return NULL;

    PyObject *domain = x[X_DOMAIN];
    if (!PyUnicode_CheckExact(domain)) return NULL;
    int unrouted = PyObject_RichCompareBool(domain, self->unknown_domain, Py_EQ);
    if (unrouted != 0) return NULL; /* the Python path's (or an error) */
    PyObject *target = h[H_RECEIVED_TARGET]; /* `received_target or target` */
    if (target == Py_None || (PyBytes_CheckExact(target) && PyBytes_GET_SIZE(target) == 0))
        target = h[H_TARGET];
    if (!PyBytes_CheckExact(target) || PyBytes_GET_SIZE(target) > TEXT_MAX) return NULL;
    if (!PyLong_CheckExact(h[H_VERSION])) return NULL;
    int overflow;
    long version = PyLong_AsLongAndOverflow(h[H_VERSION], &overflow);
    PyObject *texts[] = {self->edge, x[X_CLIENT_IP], domain, h[H_METHOD], x[X_OUTCOME],
                         d[D_RANGE], d[D_REFERER], d[D_AGENT], d[D_CONTENT_TYPE]};
    /* Fixed text, 4 integers and 3 durations (under 24 bytes each), escaped strings. */
    size_t size = TIME_LEN + 128 + 4 * 24 + 3 * 24 + (size_t)PyBytes_GET_SIZE(target) * 6 + 2;
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        Py_ssize_t text = text_size(texts[i]);
        if (text < 0) return NULL;
        size += (size_t)text;
    }
    if (maker_stamp(self, end) != 0) return NULL;
    /* Held: making the result may run a finalizer that makes a line of another hour. */
    *hour = Py_NewRef(self->hour);

    Buf b;
    char *o = buf_open(&b, size);
    if (o == NULL) return NULL;
    o = LIT(o, "[\"");
    memcpy(o, self->time_text, TIME_LEN);
    o += TIME_LEN;
    o = LIT(o, "\",");
    o = put_text(o, self->edge);
    *o++ = ',';
    o = put_text(o, x[X_CLIENT_IP]);
    *o++ = ',';
    o = put_text(o, domain);
    *o++ = ',';
    o = put_text(o, h[H_METHOD]);
    *o++ = ',';
    o = put_json_ascii(o, (const unsigned char *)PyBytes_AS_STRING(target),
                       PyBytes_GET_SIZE(target));
    if (o == NULL) { /* a byte of the target is not ASCII */
        buf_close(&b);
        return NULL;
    }
    o = version == 11 && !overflow ? LIT(o, ",\"HTTP/1.1\",") : LIT(o, ",\"HTTP/1.0\",");
    o = put_digits(o, status);
    *o++ = ',';
    o = put_digits(o, sent);
    *o++ = ',';
    o = put_digits(o, body);
    *o++ = ',';
    o = put_ms(o, request_us);
    *o++ = ',';
    o = head_s != 0.0 ? put_ms(o, ttfb_us) : LIT(o, "null");
    *o++ = ',';
    o = put_text(o, x[X_OUTCOME]);
    *o++ = ',';
    o = put_text(o, d[D_RANGE]);
    *o++ = ',';
    o = put_text(o, d[D_REFERER]);
    *o++ = ',';
    o = put_text(o, d[D_AGENT]);
    *o++ = ',';
    o = put_text(o, d[D_CONTENT_TYPE]);
    *o++ = ',';
    o = put_int(o, origin_status, origin_null);
    *o++ = ',';
    o = origin_ms != Py_None ? put_ms(o, origin_us) : LIT(o, "null");
    o = LIT(o, "]\n");
    PyObject *line = PyBytes_FromStringAndSize(b.p, (Py_ssize_t)(o - b.p));
    buf_close(&b);
    return line;
}

static PyObject *maker_format(LineMaker *self, PyObject *const *args, Py_ssize_t nargs) {
    if (self->fallback == NULL) {
        PyErr_SetString(PyExc_TypeError, "LineMaker not initialised");
        return NULL;
    }
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "format(end, end_mono, exchange)");
        return NULL;
    }
    PyObject *x[N_EXCHANGE] = {NULL}, *h[N_HEAD] = {NULL}, *d[N_LOOKED] = {NULL};
    PyObject *hour = NULL, *result = NULL;
    int r = 1;
    if (!PyFloat_CheckExact(args[0]) || !PyFloat_CheckExact(args[1])) goto done;
    r = read_values(&exchange_layout, args[2], exchange_names, N_EXCHANGE, x);
    if (r != 0) goto done;
    if (!Py_IS_TYPE(x[X_HEAD], self->head_type)) { /* refused (raw bytes), or unusual */
        r = 1;
        goto done;
    }
    r = read_values(&head_layout, x[X_HEAD], head_names, N_HEAD, h);
    if (r != 0) goto done;
    r = look_up(self, x, h, d);
    if (r != 0) goto done;
    PyObject *line = make_line(self, PyFloat_AS_DOUBLE(args[0]), PyFloat_AS_DOUBLE(args[1]),
                               x, h, d, &hour);
    if (line == NULL) {
        r = PyErr_Occurred() ? -1 : 1;
        goto done;
    }
    result = PyTuple_Pack(3, x[X_DOMAIN], hour, line);
    Py_DECREF(line);
done:
    for (int i = 0; i < N_EXCHANGE; i++) Py_XDECREF(x[i]);
    for (int i = 0; i < N_HEAD; i++) Py_XDECREF(h[i]);
    for (int i = 0; i < N_LOOKED; i++) Py_XDECREF(d[i]);
    Py_XDECREF(hour);
    if (r == 1) return PyObject_Vectorcall(self->fallback, args, 3, NULL);
    return result;
}

static PyMethodDef maker_methods[] = {
    {"format", (PyCFunction)(void (*)(void))maker_format, METH_FASTCALL,
     "format(end, end_mono, exchange) -> (directory, hour, line)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LineMakerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "edge._logline.LineMaker",
    .tp_basicsize = sizeof(LineMaker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The access-log line of an ordinary request, made in C (edge/_logline.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)maker_init,
    .tp_dealloc = (destructor)maker_dealloc,
    .tp_traverse = (traverseproc)maker_traverse,
    .tp_clear = (inquiry)maker_clear,
    .tp_methods = maker_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "edge._logline",
    .m_doc = "The access-log line of an ordinary request, made in C (see edge/accesslog.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__logline(void) {
    struct { PyObject **slot; const char *text; } names[] = {
        {&s_started, "started"}, {&s_head_at, "head_at"}, {&s_client_ip, "client_ip"},
        {&s_domain, "domain"}, {&s_head, "head"}, {&s_status, "status"},
        {&s_bytes_sent, "bytes_sent"}, {&s_body_bytes_sent, "body_bytes_sent"},
        {&s_outcome, "outcome"}, {&s_response_head, "response_head"},
        {&s_origin_status, "origin_status"}, {&s_origin_ms, "origin_ms"}, {&s_ascii, "ascii"},
        {&s_headers, "headers"}, {&s_method, "method"}, {&s_target, "target"},
        {&s_received_target, "received_target"}, {&s_version, "version"},
        {&s_range, "range"}, {&s_referer, "referer"}, {&s_user_agent, "user-agent"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (*names[i].slot == NULL) {
            *names[i].slot = PyUnicode_InternFromString(names[i].text);
            if (*names[i].slot == NULL) return NULL;
        }
    }
    if (PyType_Ready(&LineMakerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "LineMaker", (PyObject *)&LineMakerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
