/* Decode one rectangle of a JPEG, not the whole image.

   RandomResizedCrop keeps on average 60% of an image's area, and training reads each
   crop once. libjpeg-turbo can stop after the crop's last row, skip the inverse DCT and
   colour conversion of the rows above it (jpeg_skip_scanlines) and of the columns beside
   it (jpeg_crop_scanline). The pixels equal those of decoding the whole image and then
   cropping: the decoded columns extend EDGE pixels past each side of the crop (fancy
   chroma upsampling treats the first and last decoded column as the image's edge), and
   only the crop is copied out. tests/test_transforms.py checks the equality on 4:2:0,
   4:2:2, 4:4:4, progressive and grayscale JPEGs.

   size(data) -> (height, width, fits): fits is false for what this module does not
   decode to RGB itself (CMYK, YCCK, other component counts).
   decode_region(data, top, left, height, width, out) -> clean: writes the crop's uint8
   RGB rows into `out` (a writable C-contiguous buffer of height * width * 3 bytes);
   clean is false when libjpeg warned (corrupt data it worked around). Raises ValueError
   on a libjpeg error, on a region that is empty, negative or outside the image (checked
   in 64 bits, before anything is written), and when the data ends before the region's
   last row (every libjpeg return is checked). The GIL is released while decoding. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

#define EDGE 16

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int warnings;
    char message[JMSG_LENGTH_MAX];
} error_mgr;

static void on_error(j_common_ptr cinfo) {
    error_mgr *err = (error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    error_mgr *err = (error_mgr *)cinfo->err;
    if (level < 0) err->warnings++;  /* warnings only; trace messages are ignored */
}

static void init(struct jpeg_decompress_struct *cinfo, error_mgr *err) {
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->warnings = 0;
    err->message[0] = '\0';
    jpeg_create_decompress(cinfo);
}

static PyObject *size(PyObject *self, PyObject *args) {
    Py_buffer data;
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    if (data.len == 0 || (unsigned long long)data.len > ULONG_MAX) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "JPEG header: empty or oversized data");
        return NULL;
    }
    init(&cinfo, &err);
    if (setjmp(err.jump) == 0) {
        jpeg_mem_src(&cinfo, data.buf, (unsigned long)data.len);
        if (jpeg_read_header(&cinfo, TRUE) != JPEG_HEADER_OK) {
            strcpy(err.message, "no image in the data");
            longjmp(err.jump, 1);
        }
        int fits = (cinfo.num_components == 3 &&
                    (cinfo.jpeg_color_space == JCS_YCbCr || cinfo.jpeg_color_space == JCS_RGB)) ||
                   (cinfo.num_components == 1 && cinfo.jpeg_color_space == JCS_GRAYSCALE);
        result = Py_BuildValue("IIO", cinfo.image_height, cinfo.image_width, fits ? Py_True : Py_False);
    } else {
        PyErr_Format(PyExc_ValueError, "JPEG header: %s", err.message);
    }
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return result;
}

/* An int argument as Py_ssize_t; 0 (no exception set) for what is not an int or does not fit. */
static int ssize_arg(PyObject *obj, Py_ssize_t *value) {
    PyObject *index = PyNumber_Index(obj);
    *value = index ? PyLong_AsSsize_t(index) : -1;
    Py_XDECREF(index);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    Py_ssize_t top, left, height, width;
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    JSAMPROW volatile row = NULL;  /* volatile: kept across a longjmp from libjpeg */
    const char *volatile problem = NULL;
    PyObject *top_arg, *left_arg, *height_arg, *width_arg;
    if (!PyArg_ParseTuple(args, "y*OOOOw*", &data, &top_arg, &left_arg, &height_arg, &width_arg, &out)) return NULL;
    const char *bad = NULL;
    if (!ssize_arg(top_arg, &top) || !ssize_arg(left_arg, &left) || !ssize_arg(height_arg, &height) ||
        !ssize_arg(width_arg, &width)) {
        bad = "top, left, height and width must be integers that fit in a Py_ssize_t";
    } else if (top < 0 || left < 0 || height <= 0 || width <= 0) {
        bad = "top and left must be >= 0, height and width > 0";
    } else if (height > 0xFFFFFF || width > 0xFFFFFF) {  /* past any JPEG's 65,535 px side */
        bad = "the region lies outside the image";
    } else if (!PyBuffer_IsContiguous(&out, 'C') || (uint64_t)out.len != (uint64_t)height * (uint64_t)width * 3) {
        bad = "out must be a C-contiguous buffer of height * width * 3 bytes";
    } else if (data.len == 0 || (unsigned long long)data.len > ULONG_MAX) {
        bad = "empty or oversized data";
    }
    if (bad) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        PyErr_Format(PyExc_ValueError, "JPEG region: %s", bad);
        return NULL;
    }
    init(&cinfo, &err);
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(err.jump) == 0) {
        jpeg_mem_src(&cinfo, data.buf, (unsigned long)data.len);
        int header = jpeg_read_header(&cinfo, TRUE);
        cinfo.out_color_space = JCS_RGB;
        if (header != JPEG_HEADER_OK) {
            problem = "no image in the data";
        } else if (!jpeg_start_decompress(&cinfo)) {
            problem = "the decoder stopped before the first row";
        } else if ((uint64_t)top + (uint64_t)height > cinfo.output_height ||
                   (uint64_t)left + (uint64_t)width > cinfo.output_width) {
            problem = "the region lies outside the image";
        } else {
            uint64_t right = (uint64_t)left + (uint64_t)width + EDGE;
            JDIMENSION x = left > EDGE ? (JDIMENSION)(left - EDGE) : 0;
            JDIMENSION end = right < cinfo.output_width ? (JDIMENSION)right : cinfo.output_width;
            JDIMENSION span = end - x;
            jpeg_crop_scanline(&cinfo, &x, &span);  /* moves x left to an iMCU boundary */
            JSAMPROW buf = malloc((size_t)span * 3);
            row = buf;
            if (buf == NULL) {
                problem = "out of memory";
            } else {
                size_t shift = (size_t)((JDIMENSION)left - x) * 3, bytes = (size_t)width * 3;
                unsigned char *dst = out.buf;
                if (shift + bytes > (size_t)span * 3) {
                    problem = "the region lies outside the decoded columns";
                } else if (top && jpeg_skip_scanlines(&cinfo, (JDIMENSION)top) != (JDIMENSION)top) {
                    problem = "the image ends before the region's first row";
                } else {
                    for (Py_ssize_t r = 0; r < height; r++) {
                        if (jpeg_read_scanlines(&cinfo, &buf, 1) != 1) {
                            problem = "the image ends before the region's last row";
                            break;
                        }
                        memcpy(dst + (size_t)r * bytes, buf + shift, bytes);
                    }
                }
            }
        }
    } else {
        problem = err.message;
    }
    Py_END_ALLOW_THREADS
    free(row);
    jpeg_destroy_decompress(&cinfo);  /* also ends a decode stopped after the region's last row */
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (problem) {
        PyErr_Format(PyExc_ValueError, "JPEG region: %s", problem);
        return NULL;
    }
    return PyBool_FromLong(err.warnings == 0);
}

static PyMethodDef methods[] = {
    {"size", size, METH_VARARGS, "size(data) -> (height, width, fits)"},
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, top, left, height, width, out) -> clean"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "mae_jpeg_region",
                                    "Decode one rectangle of a JPEG (libjpeg-turbo).", -1, methods};

PyMODINIT_FUNC PyInit_mae_jpeg_region(void) { return PyModule_Create(&module); }
