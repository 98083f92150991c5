/* edgegw.stdf._accel: the optional compiled record loop of the STDF decoder.
 *
 * Pure Python (decoder.py) is the reference and always available; this module only
 * makes the common records faster.  It is table-driven: decoder.py hands it the spec
 * table (edgegw.stdf.spec) as tuples, so there is one description of STDF, and the
 * field-by-field semantics here are those of decoder.decode_generic -- a field that does
 * not fit in what is left of its record ends the record (it and every later field are
 * absent).  Anything else -- a FAR, an unknown record type, an impossible REC_LEN, a GDR
 * with an unknown type code -- stops the loop at that record, which the Python loop then
 * reads (and reports), so the errors and the unknown-record rules live in one place.
 *
 * Built against the stable ABI (Py_LIMITED_API 3.11): one wheel per platform serves
 * every CPython >= 3.11, and a Windows build needs only python3.dll.
 */
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

enum {
    T_U1 = 1, T_U2, T_U4, T_U8, T_I1, T_I2, T_I4, T_I8, T_R4, T_R8, T_B1, T_C1,
    T_CN, T_BN, T_SN, T_DN, T_CF, T_UF, T_N1, T_VN
};

typedef struct {
    int type;
    int count;  /* index of the field holding the element count, or -1 */
    int size;   /* index of the field holding the element size (Uf, Cf), or -1 */
} FieldDesc;

typedef struct {
    PyObject *name;   /* the record type's name (str) */
    PyObject *names;  /* tuple of its field names (for dicts) */
    Py_ssize_t limit; /* largest REC_LEN the Python loop accepts */
    int nfields;
    int stop;         /* the Python loop reads every record of this type (the FAR) */
    FieldDesc *fields;
    /* by field count n: a dict of the first n field names (values None), which a
     * record's dict is copied from -- a copy of a dict's keys is one block copy, where
     * setting n new keys grows the table several times */
    PyObject **templates;
} RecDesc;

typedef struct {
    PyObject_HEAD
    int big;
    RecDesc *recs[65536];  /* by the type key: REC_TYP, REC_SUB read as one U2 */
    PyObject *bits;        /* edgegw.stdf.spec.Bits */
    PyObject *record;      /* edgegw.stdf.decoder.StdfRecord */
} Table;

typedef struct {
    PyObject_HEAD
    PyObject *table;
    PyObject *decoder;
    PyObject *buf;
    PyObject *skipped;        /* decoder.skipped */
    PyObject *skipped_short;  /* decoder.skipped_short */
    const unsigned char *data;
    Py_ssize_t n;
    Py_ssize_t pos;
    Py_ssize_t base;
    Py_ssize_t short_len;
    int rows;
    int done;         /* 1: the end of the bytes fed (or a cut record); 0: a record for Python */
    unsigned char *skip;  /* 65536 flags: the type is skipped */
} Scan;

static PyObject *s_pos;  /* "_pos" */
static PyObject *one;    /* 1 */
static newfunc tuple_new;

/* ---------------------------------------------------------------- numbers */

static inline unsigned long long rd(const unsigned char *p, int n, int big) {
    unsigned long long v = 0;
    int i;
    if (big) {
        for (i = 0; i < n; i++) v = (v << 8) | p[i];
    } else {
        for (i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    }
    return v;
}

static int scalar_size(int type) {
    switch (type) {
    case T_U1: case T_I1: case T_B1: case T_C1: case T_N1: return 1;
    case T_U2: case T_I2: return 2;
    case T_U4: case T_I4: case T_R4: return 4;
    case T_U8: case T_I8: case T_R8: return 8;
    default: return 0;
    }
}

/* A fixed-size scalar at p (the caller checked it fits); *raw gets its integer value. */
static PyObject *scalar(int type, const unsigned char *p, int big, long long *raw) {
    unsigned long long v;
    switch (type) {
    case T_U1: case T_B1: *raw = p[0]; return PyLong_FromLong(p[0]);
    case T_N1: *raw = p[0] & 0x0F; return PyLong_FromLong(p[0] & 0x0F);
    case T_U2: v = rd(p, 2, big); *raw = (long long)v; return PyLong_FromLong((long)v);
    case T_U4: v = rd(p, 4, big); *raw = (long long)v; return PyLong_FromUnsignedLongLong(v);
    case T_U8: v = rd(p, 8, big); *raw = (long long)v; return PyLong_FromUnsignedLongLong(v);
    case T_I1: *raw = (signed char)p[0]; return PyLong_FromLong((signed char)p[0]);
    case T_I2: *raw = (short)rd(p, 2, big); return PyLong_FromLong((long)*raw);
    case T_I4: *raw = (int)rd(p, 4, big); return PyLong_FromLong((long)*raw);
    case T_I8: *raw = (long long)rd(p, 8, big); return PyLong_FromLongLong(*raw);
    case T_R4: {
        unsigned int u = (unsigned int)rd(p, 4, big);
        float f;
        memcpy(&f, &u, 4);
        *raw = 0;
        return PyFloat_FromDouble((double)f);
    }
    case T_R8: {
        unsigned long long u = rd(p, 8, big);
        double d;
        memcpy(&d, &u, 8);
        *raw = 0;
        return PyFloat_FromDouble(d);
    }
    case T_C1: *raw = p[0]; return PyUnicode_DecodeLatin1((const char *)p, 1, NULL);
    }
    PyErr_SetString(PyExc_SystemError, "edgegw.stdf._accel: not a scalar type");
    return NULL;
}

/* ---------------------------------------------------------------- fields
 * read_one/read_array return a new reference and advance *pp, or return NULL with
 * *short_ set (the field does not fit: the record ends before it), or NULL with a
 * Python error set, or NULL with *bad set (a GDR type code Python must report). */

typedef struct {
    const unsigned char *data;
    Py_ssize_t end;
    int big;
    Table *table;
    int short_;
    int bad;
} Ctx;

static PyObject *read_one(Ctx *c, int type, Py_ssize_t *pp, long long size, long long *raw);

/* A GDR's type codes 0-12: the field type each value is read as (0: none; code 0 is a
 * pad byte, 9 is unassigned; 13, N*1 in a whole byte, is read apart). */
static const int VN_TYPES[] = {0, T_U1, T_U2, T_U4, T_I1, T_I2, T_I4, T_R4, T_R8, 0, T_CN,
                               T_BN, T_DN};

static PyObject *read_vn(Ctx *c, Py_ssize_t *pp) {
    Py_ssize_t p = *pp, i, count;
    PyObject *out;
    if (p + 2 > c->end) { c->short_ = 1; return NULL; }
    count = (Py_ssize_t)rd(c->data + p, 2, c->big);
    p += 2;
    out = PyList_New(count);  /* (items left NULL on failure: list_dealloc skips them) */
    if (out == NULL) return NULL;
    for (i = 0; i < count; i++) {
        int code;
        PyObject *value, *pair;
        long long raw;
        if (p >= c->end) { c->short_ = 1; goto fail; }
        code = c->data[p];
        p += 1;
        if (code == 0) {
            value = Py_None;
            Py_INCREF(value);
        } else if (code == 13) {  /* N*1 in a GDR occupies a whole byte: kept whole */
            if (p >= c->end) { c->short_ = 1; goto fail; }
            value = PyLong_FromLong(c->data[p]);
            p += 1;
        } else if (code <= 12 && VN_TYPES[code] != 0) {
            value = read_one(c, VN_TYPES[code], &p, 0, &raw);
        } else {
            c->bad = 1;  /* an unknown type code: Python reports it */
            goto fail;
        }
        if (value == NULL) goto fail;
        pair = PyTuple_New(2);
        if (pair == NULL) { Py_DECREF(value); goto fail; }
        PyTuple_SetItem(pair, 0, PyLong_FromLong(code));  /* (a cached small int) */
        PyTuple_SetItem(pair, 1, value);
        PyList_SetItem(out, i, pair);
    }
    *pp = p;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* A skipped GDR's check: walk its type codes as read_vn reads them, making no values.
 * 1: an unknown type code (the Python loop reports it); 0: none before the record ends. */
static int check_vn(Ctx *c, Py_ssize_t p) {
    Py_ssize_t count, i;
    if (p + 2 > c->end) return 0;
    count = (Py_ssize_t)rd(c->data + p, 2, c->big);
    p += 2;
    for (i = 0; i < count; i++) {
        int code;
        if (p >= c->end) return 0;
        code = c->data[p];
        p += 1;
        if (code == 0) continue;
        if (code == 13) {  /* N*1 in a whole byte */
            p += 1;
        } else if (code > 12 || VN_TYPES[code] == 0) {
            return 1;
        } else if (VN_TYPES[code] == T_CN || VN_TYPES[code] == T_BN) {
            if (p >= c->end) return 0;
            p += 1 + c->data[p];
        } else if (VN_TYPES[code] == T_DN) {
            if (p + 2 > c->end) return 0;
            p += 2 + (Py_ssize_t)((rd(c->data + p, 2, c->big) + 7) / 8);
        } else {
            p += scalar_size(VN_TYPES[code]);
        }
        if (p > c->end) return 0;  /* the value runs past the record: cut, no error */
    }
    return 0;
}

static PyObject *read_one(Ctx *c, int type, Py_ssize_t *pp, long long size, long long *raw) {
    Py_ssize_t p = *pp, q;
    int n;
    *raw = 0;
    switch (type) {
    case T_CN: case T_BN:
        if (p >= c->end) break;
        q = p + 1 + c->data[p];
        if (q > c->end) break;
        *pp = q;
        if (type == T_CN)
            return PyUnicode_DecodeLatin1((const char *)c->data + p + 1, q - p - 1, NULL);
        return PyBytes_FromStringAndSize((const char *)c->data + p + 1, q - p - 1);
    case T_SN:
        if (p + 2 > c->end) break;
        q = p + 2 + (Py_ssize_t)rd(c->data + p, 2, c->big);
        if (q > c->end) break;
        *pp = q;
        return PyUnicode_DecodeLatin1((const char *)c->data + p + 2, q - p - 2, NULL);
    case T_DN: {
        unsigned int nbits;
        PyObject *bytes, *args, *bits;
        if (p + 2 > c->end) break;
        nbits = (unsigned int)rd(c->data + p, 2, c->big);
        q = p + 2 + (nbits + 7) / 8;
        if (q > c->end) break;
        bytes = PyBytes_FromStringAndSize((const char *)c->data + p + 2, q - p - 2);
        if (bytes == NULL) return NULL;
        args = Py_BuildValue("((IN))", nbits, bytes);
        if (args == NULL) return NULL;
        bits = tuple_new((PyTypeObject *)c->table->bits, args, NULL);
        Py_DECREF(args);
        if (bits != NULL) *pp = q;
        return bits;
    }
    case T_VN:
        return read_vn(c, pp);
    case T_CF:
        if (size < 0 || p + size > c->end) break;
        *pp = p + (Py_ssize_t)size;
        return PyUnicode_DecodeLatin1((const char *)c->data + p, (Py_ssize_t)size, NULL);
    case T_UF: {
        unsigned long long v;
        if (size != 1 && size != 2 && size != 4 && size != 8) break;
        if (p + size > c->end) break;
        v = rd(c->data + p, (int)size, c->big);
        *raw = (long long)v;
        *pp = p + (Py_ssize_t)size;
        return PyLong_FromUnsignedLongLong(v);
    }
    default:
        n = scalar_size(type);
        if (n == 0 || p + n > c->end) break;
        *pp = p + n;
        return scalar(type, c->data + p, c->big, raw);
    }
    c->short_ = 1;
    return NULL;
}

static PyObject *read_array(Ctx *c, int type, long long count, Py_ssize_t *pp, long long size) {
    Py_ssize_t p = *pp, i;
    PyObject *out;
    long long raw;
    if (type == T_N1) {
        Py_ssize_t q = p + (Py_ssize_t)((count + 1) / 2);
        if (q > c->end) { c->short_ = 1; return NULL; }
        out = PyList_New((Py_ssize_t)count);
        if (out == NULL) return NULL;
        for (i = 0; i < count; i++) {
            unsigned char b = c->data[p + i / 2];
            PyObject *v = PyLong_FromLong((i & 1) ? (b >> 4) : (b & 0x0F));
            if (v == NULL) { Py_DECREF(out); return NULL; }
            PyList_SetItem(out, i, v);
        }
        *pp = q;
        return out;
    }
    if (type != T_C1 && scalar_size(type) > 0) {
        int n = scalar_size(type);
        Py_ssize_t q = p + (Py_ssize_t)count * n;
        if (q > c->end) { c->short_ = 1; return NULL; }
        out = PyList_New((Py_ssize_t)count);
        if (out == NULL) return NULL;
        for (i = 0; i < count; i++) {
            PyObject *v = scalar(type, c->data + p + i * n, c->big, &raw);
            if (v == NULL) { Py_DECREF(out); return NULL; }
            PyList_SetItem(out, i, v);
        }
        *pp = q;
        return out;
    }
    out = PyList_New((Py_ssize_t)count);
    if (out == NULL) return NULL;
    for (i = 0; i < count; i++) {
        PyObject *v = read_one(c, type, &p, size, &raw);
        if (v == NULL) { Py_DECREF(out); return NULL; }
        PyList_SetItem(out, i, v);
    }
    *pp = p;
    return out;
}

#define MAX_FIELDS 128

/* The fields of one record, as decode_generic reads them: a tuple of the values present
 * (rows) or their dict.  NULL with c->bad set: Python reads this record. */
static PyObject *decode_fields(Ctx *c, RecDesc *rec, Py_ssize_t p, int rows) {
    PyObject *values[MAX_FIELDS];
    long long raws[MAX_FIELDS];
    int i, k, n = 0;
    PyObject *out = NULL;
    c->short_ = 0;
    c->bad = 0;
    for (i = 0; i < rec->nfields; i++) {
        FieldDesc *f = &rec->fields[i];
        long long size = f->size >= 0 ? raws[f->size] : 0;
        PyObject *v;
        if (f->count >= 0) {
            v = read_array(c, f->type, raws[f->count], &p, size);
            raws[i] = 0;
        } else {
            v = read_one(c, f->type, &p, size, &raws[i]);
        }
        if (v == NULL) {
            if (c->short_ && !PyErr_Occurred()) break;
            goto done;
        }
        values[n++] = v;
    }
    if (rows) {
        out = PyTuple_New(n);
        if (out == NULL) goto done;
        for (k = 0; k < n; k++) {
            PyTuple_SetItem(out, k, values[k]);
            values[k] = NULL;
        }
    } else {
        PyObject *template = rec->templates[n];
        if (template == NULL) {
            template = PyDict_New();
            if (template == NULL) goto done;
            for (k = 0; k < n; k++) {
                if (PyDict_SetItem(template, PyTuple_GetItem(rec->names, k), Py_None) < 0) {
                    Py_DECREF(template);
                    goto done;
                }
            }
            rec->templates[n] = template;
        }
        out = PyDict_Copy(template);
        if (out == NULL) goto done;
        for (k = 0; k < n; k++) {
            if (PyDict_SetItem(out, PyTuple_GetItem(rec->names, k), values[k]) < 0) {
                Py_CLEAR(out);
                goto done;
            }
        }
    }
done:
    for (k = 0; k < n; k++) Py_XDECREF(values[k]);
    return out;
}

/* ---------------------------------------------------------------- Table */

static void rec_free(RecDesc *rec) {
    if (rec == NULL) return;
    Py_XDECREF(rec->name);
    Py_XDECREF(rec->names);
    if (rec->templates != NULL) {
        int k;
        for (k = 0; k <= rec->nfields; k++) Py_XDECREF(rec->templates[k]);
        PyMem_Free(rec->templates);
    }
    PyMem_Free(rec->fields);
    PyMem_Free(rec);
}

static void table_dealloc(PyObject *self) {
    Table *t = (Table *)self;
    PyTypeObject *tp = Py_TYPE(self);
    int k;
    for (k = 0; k < 65536; k++) rec_free(t->recs[k]);
    Py_XDECREF(t->bits);
    Py_XDECREF(t->record);
    ((freefunc)PyType_GetSlot(tp, Py_tp_free))(self);
    Py_DECREF(tp);
}

/* Table(big, records, Bits, StdfRecord); records: (key, name, limit, stop, names,
 * ((type, count_index, size_index), ...)) for each record type. */
static PyObject *table_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    int big;
    PyObject *records, *bits, *record;
    Table *t;
    Py_ssize_t i, nrec;
    if (!PyArg_ParseTuple(args, "pOOO", &big, &records, &bits, &record)) return NULL;
    t = (Table *)((allocfunc)PyType_GetSlot(tp, Py_tp_alloc))(tp, 0);
    if (t == NULL) return NULL;
    t->big = big;
    memset(t->recs, 0, sizeof(t->recs));
    Py_INCREF(bits);
    t->bits = bits;
    Py_INCREF(record);
    t->record = record;
    nrec = PySequence_Size(records);
    if (nrec < 0) goto fail;
    for (i = 0; i < nrec; i++) {
        PyObject *item = PySequence_GetItem(records, i), *name, *names, *fields;
        long key;
        Py_ssize_t limit, nf, j;
        int stop;
        RecDesc *rec;
        if (item == NULL) goto fail;
        if (!PyArg_ParseTuple(item, "lUnpO!O!", &key, &name, &limit, &stop, &PyTuple_Type,
                              &names, &PyTuple_Type, &fields)) {
            Py_DECREF(item);
            goto fail;
        }
        nf = PyTuple_Size(fields);
        if (key < 0 || key > 65535 || nf > MAX_FIELDS || t->recs[key] != NULL) {
            Py_DECREF(item);
            PyErr_SetString(PyExc_ValueError, "bad record table entry");
            goto fail;
        }
        rec = PyMem_Calloc(1, sizeof(RecDesc));
        if (rec == NULL) { Py_DECREF(item); PyErr_NoMemory(); goto fail; }
        t->recs[key] = rec;
        Py_INCREF(name);
        rec->name = name;
        Py_INCREF(names);
        rec->names = names;
        rec->limit = limit;
        rec->stop = stop;
        rec->nfields = (int)nf;
        rec->fields = PyMem_Calloc(nf ? nf : 1, sizeof(FieldDesc));
        rec->templates = PyMem_Calloc(nf + 1, sizeof(PyObject *));
        if (rec->fields == NULL || rec->templates == NULL) {
            Py_DECREF(item);
            PyErr_NoMemory();
            goto fail;
        }
        for (j = 0; j < nf; j++) {
            FieldDesc *f = &rec->fields[j];
            if (!PyArg_ParseTuple(PyTuple_GetItem(fields, j), "iii", &f->type, &f->count,
                                  &f->size)) {
                Py_DECREF(item);
                goto fail;
            }
            if (f->type < T_U1 || f->type > T_VN || f->count >= j || f->size >= j) {
                Py_DECREF(item);
                PyErr_SetString(PyExc_ValueError, "bad field descriptor");
                goto fail;
            }
        }
        Py_DECREF(item);
    }
    return (PyObject *)t;
fail:
    Py_DECREF(t);
    return NULL;
}

static PyType_Slot table_slots[] = {
    {Py_tp_new, table_new},
    {Py_tp_dealloc, table_dealloc},
    {Py_tp_doc, "The record table of one byte order (built by edgegw.stdf.decoder)."},
    {0, NULL},
};

static PyType_Spec table_spec = {
    "edgegw.stdf._accel.Table", sizeof(Table), 0, Py_TPFLAGS_DEFAULT, table_slots,
};

/* ---------------------------------------------------------------- Scan */

static int scan_traverse(PyObject *self, visitproc visit, void *arg) {
    Scan *s = (Scan *)self;
    Py_VISIT(Py_TYPE(self));  /* (a heap type's instances hold it) */
    Py_VISIT(s->table);
    Py_VISIT(s->decoder);
    Py_VISIT(s->skipped);
    Py_VISIT(s->skipped_short);
    return 0;
}

static int scan_clear(PyObject *self) {
    Scan *s = (Scan *)self;
    Py_CLEAR(s->table);
    Py_CLEAR(s->decoder);
    Py_CLEAR(s->buf);
    Py_CLEAR(s->skipped);
    Py_CLEAR(s->skipped_short);
    return 0;
}

static void scan_dealloc(PyObject *self) {
    Scan *s = (Scan *)self;
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    scan_clear(self);
    PyMem_Free(s->skip);
    ((freefunc)PyType_GetSlot(tp, Py_tp_free))(self);
    Py_DECREF(tp);
}

/* Scan(table, decoder, buf, pos, base, rows, skip_keys, short) */
static PyObject *scan_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    PyObject *table, *decoder, *buf, *skip_keys;
    Py_ssize_t pos, base, short_len, i, nkeys;
    int rows;
    Scan *s;
    if (!PyArg_ParseTuple(args, "OOO!nnpOn", &table, &decoder, &PyBytes_Type, &buf, &pos,
                          &base, &rows, &skip_keys, &short_len))
        return NULL;
    s = (Scan *)((allocfunc)PyType_GetSlot(tp, Py_tp_alloc))(tp, 0);
    if (s == NULL) return NULL;
    Py_INCREF(table);
    s->table = table;
    Py_INCREF(decoder);
    s->decoder = decoder;
    Py_INCREF(buf);
    s->buf = buf;
    s->data = (const unsigned char *)PyBytes_AsString(buf);
    s->n = PyBytes_Size(buf);
    s->pos = pos;
    s->base = base;
    s->rows = rows;
    s->short_len = short_len;
    s->done = 1;
    s->skip = PyMem_Calloc(65536, 1);
    if (s->skip == NULL) { Py_DECREF(s); return PyErr_NoMemory(); }
    nkeys = PySequence_Size(skip_keys);
    if (nkeys < 0) { Py_DECREF(s); return NULL; }
    for (i = 0; i < nkeys; i++) {
        PyObject *k = PySequence_GetItem(skip_keys, i);
        long key;
        if (k == NULL) { Py_DECREF(s); return NULL; }
        key = PyLong_AsLong(k);
        Py_DECREF(k);
        if (key < 0 || key > 65535) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad type key");
            Py_DECREF(s);
            return NULL;
        }
        s->skip[key] = 1;
    }
    if (nkeys) {
        s->skipped = PyObject_GetAttrString(decoder, "skipped");
        s->skipped_short = PyObject_GetAttrString(decoder, "skipped_short");
        if (s->skipped == NULL || s->skipped_short == NULL) { Py_DECREF(s); return NULL; }
    }
    if (s->data == NULL) { Py_DECREF(s); return NULL; }
    return (PyObject *)s;
}

static int set_pos(Scan *s) {
    PyObject *v = PyLong_FromSsize_t(s->pos);
    int rc;
    if (v == NULL) return -1;
    rc = PyObject_SetAttr(s->decoder, s_pos, v);
    Py_DECREF(v);
    return rc;
}

static int count(PyObject *dict, PyObject *name) {
    PyObject *old = PyDict_GetItemWithError(dict, name), *new;
    int rc;
    if (old == NULL) {  /* (select() makes every skipped name's count: not here) */
        if (PyErr_Occurred()) return -1;
        return PyDict_SetItem(dict, name, one);
    }
    new = PyNumber_Add(old, one);
    if (new == NULL) return -1;
    rc = PyDict_SetItem(dict, name, new);
    Py_DECREF(new);
    return rc;
}

static PyObject *scan_next(PyObject *self) {
    Scan *s = (Scan *)self;
    Table *t = (Table *)s->table;
    const unsigned char *data = s->data;
    Ctx c;
    c.data = data;
    c.big = t->big;
    c.table = t;
    if (s->buf == NULL) return NULL;  /* (closed) */
    while (s->pos + 4 <= s->n) {
        Py_ssize_t pos = s->pos, rec_len, end;
        unsigned int key;
        RecDesc *rec;
        PyObject *fields, *offset, *out;
        if (t->big) {
            rec_len = (data[pos] << 8) | data[pos + 1];
            key = (data[pos + 2] << 8) | data[pos + 3];
        } else {
            rec_len = data[pos] | (data[pos + 1] << 8);
            key = data[pos + 2] | (data[pos + 3] << 8);
        }
        rec = t->recs[key];
        if (rec == NULL || rec->stop || rec_len > rec->limit) {
            s->done = 0;  /* the Python loop reads (or reports) this one */
            break;
        }
        end = pos + 4 + rec_len;
        if (end > s->n) break;  /* cut: waits for the rest */
        c.end = end;
        if (s->skip[key]) {
            /* a skipped GDR is still walked for its type codes (the one error inside
             * a record): with an unknown one, Python reads it (and reports it) */
            if (rec->nfields == 1 && rec->fields[0].type == T_VN && check_vn(&c, pos + 4)) {
                s->done = 0;
                break;
            }
            if (count(s->skipped, rec->name) < 0) return NULL;
            if (rec_len < s->short_len && count(s->skipped_short, rec->name) < 0)
                return NULL;
            s->pos = end;
            continue;
        }
        fields = decode_fields(&c, rec, pos + 4, s->rows);
        if (fields == NULL) {
            if (c.bad && !PyErr_Occurred()) { s->done = 0; break; }
            return NULL;
        }
        offset = PyLong_FromSsize_t(s->base + pos);
        if (offset == NULL) { Py_DECREF(fields); return NULL; }
        Py_INCREF(rec->name);
        out = PyTuple_New(3);
        if (out == NULL) { Py_DECREF(rec->name); Py_DECREF(offset); Py_DECREF(fields); return NULL; }
        PyTuple_SetItem(out, 0, rec->name);
        PyTuple_SetItem(out, 1, offset);
        PyTuple_SetItem(out, 2, fields);
        if (!s->rows) {
            PyObject *args = PyTuple_Pack(1, out), *record;
            Py_DECREF(out);
            if (args == NULL) return NULL;
            record = tuple_new((PyTypeObject *)t->record, args, NULL);
            Py_DECREF(args);
            if (record == NULL) return NULL;
            out = record;
        }
        s->pos = end;
        if (set_pos(s) < 0) { Py_DECREF(out); return NULL; }
        return out;
    }
    set_pos(s);
    return NULL;
}

static PyObject *scan_close(PyObject *self, PyObject *unused) {
    Scan *s = (Scan *)self;
    Py_CLEAR(s->buf);
    Py_RETURN_NONE;
}

static PyObject *scan_get_done(PyObject *self, void *closure) {
    return PyBool_FromLong(((Scan *)self)->done);
}

static PyMethodDef scan_methods[] = {
    {"close", scan_close, METH_NOARGS, "Stop: the next call ends the iteration."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef scan_getset[] = {
    {"done", scan_get_done, NULL,
     "After the iteration ended: True at the end of the bytes fed (or a cut record), "
     "False at a record the Python loop must read.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot scan_slots[] = {
    {Py_tp_new, scan_new},
    {Py_tp_dealloc, scan_dealloc},
    {Py_tp_traverse, scan_traverse},
    {Py_tp_clear, scan_clear},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, scan_next},
    {Py_tp_methods, scan_methods},
    {Py_tp_getset, scan_getset},
    {Py_tp_doc, "The records of a buffer from a position, until one Python must read."},
    {0, NULL},
};

static PyType_Spec scan_spec = {
    "edgegw.stdf._accel.Scan", sizeof(Scan), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    scan_slots,
};

/* ---------------------------------------------------------------- module */

static int accel_exec(PyObject *m) {
    PyObject *table, *scan;
    s_pos = PyUnicode_InternFromString("_pos");
    if (s_pos == NULL) return -1;
    one = PyLong_FromLong(1);
    if (one == NULL) return -1;
    tuple_new = (newfunc)PyType_GetSlot(&PyTuple_Type, Py_tp_new);
    if (tuple_new == NULL) return -1;
    table = PyType_FromSpec(&table_spec);
    if (table == NULL) return -1;
    if (PyModule_AddObject(m, "Table", table) < 0) { Py_DECREF(table); return -1; }
    scan = PyType_FromSpec(&scan_spec);
    if (scan == NULL) return -1;
    if (PyModule_AddObject(m, "Scan", scan) < 0) { Py_DECREF(scan); return -1; }
    return PyModule_AddIntConstant(m, "VERSION", 1);
}

static PyModuleDef_Slot accel_slots[] = {
    {Py_mod_exec, accel_exec},
    {0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT, "_accel",
    "The optional compiled record loop of edgegw's STDF decoder (see decoder.py).",
    0, NULL, accel_slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__accel(void) {
    return PyModuleDef_Init(&accel_module);
}
