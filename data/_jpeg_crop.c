/*
 * data._jpeg_crop: cropped JPEG decode (what tf.data's decode_and_crop_jpeg does) on the system
 * libjpeg-turbo. Rows above the box are skipped with jpeg_skip_scanlines (whole iMCU rows are
 * entropy-decoded only: no IDCT, upsampling or colour conversion), rows below it are never
 * decoded (jpeg_abort_decompress after the last one), and jpeg_crop_scanline restricts the
 * IDCT/upsampling/colour conversion to the iMCU columns that cover the box.
 *
 * Plain CPython C-API (no numpy) so the build needs nothing but the libjpeg headers. The libjpeg
 * work runs without the GIL; libjpeg errors come back through setjmp/longjmp as ValueError with
 * libjpeg's message, corrupt-data warnings (e.g. a truncated file) are not fatal.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h> /* jpeglib.h needs FILE and size_t */
#include <string.h>

#include <jpeglib.h>

#ifndef LIBJPEG_TURBO_VERSION_NUMBER
#error "data._jpeg_crop needs libjpeg-turbo (jpeg_crop_scanline / jpeg_skip_scanlines)"
#endif

/* Columns decoded on each side of the box beyond what was asked for. Fancy (smooth) chroma
 * upsampling reads the neighbouring chroma sample, and libjpeg treats the edges of the cropped
 * region as image edges; one extra output column keeps every requested column away from the
 * region's edges, so its pixels are bit-identical to a full decode. */
#define CROP_MARGIN 1
/* Narrowest region handed to jpeg_crop_scanline (unless the image is narrower): keeps every
 * component at >= 2 downsampled columns (4x horizontal subsampling at most), so libjpeg never
 * takes its re-initialise-the-upsampler path for very narrow crops. */
#define CROP_MIN_WIDTH 16
/* Rows asked of jpeg_read_scanlines per call: an iMCU row of 4:2:0 at full scale. */
#define READ_ROWS 16

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} crop_error_mgr;

typedef struct {
    struct jpeg_decompress_struct cinfo;
    crop_error_mgr err;
    int created;
    /* inputs */
    const unsigned char *data;
    unsigned long size;
    int scale_num, fast;
    JDIMENSION y, x, h, w;
    /* outputs of read_header_dims */
    JDIMENSION out_height, out_width, image_height, image_width;
    J_COLOR_SPACE jpeg_color_space;
} crop_ctx;

static void crop_error_exit(j_common_ptr cinfo)
{
    crop_error_mgr *err = (crop_error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* Warnings (corrupt data, premature end) are counted by the default emit_message and otherwise
 * silent: libjpeg's default prints them to stderr. */
static void crop_output_message(j_common_ptr cinfo)
{
    (void)cinfo;
}

/* Phase 1, without the GIL: header and output dimensions at the requested scale. Returns 0 on
 * success, -1 after a libjpeg error (message in ctx->err.message). All state lives in *ctx, so
 * nothing this frame modifies after setjmp is read after the longjmp. */
static int read_header_dims(crop_ctx *ctx)
{
    struct jpeg_decompress_struct *cinfo = &ctx->cinfo;

    cinfo->err = jpeg_std_error(&ctx->err.pub);
    ctx->err.pub.error_exit = crop_error_exit;
    ctx->err.pub.output_message = crop_output_message;
    if (setjmp(ctx->err.jump))
        return -1;
    /* Before create: a failure inside it may already hold pool memory, and destroy() on the
     * zeroed struct is safe (it checks cinfo->mem). */
    ctx->created = 1;
    jpeg_create_decompress(cinfo);
    jpeg_mem_src(cinfo, ctx->data, ctx->size);
    jpeg_read_header(cinfo, TRUE);
    ctx->jpeg_color_space = cinfo->jpeg_color_space;
    ctx->image_height = cinfo->image_height;
    ctx->image_width = cinfo->image_width;
    if (cinfo->jpeg_color_space == JCS_CMYK || cinfo->jpeg_color_space == JCS_YCCK)
        return 0; /* rejected by the caller: libjpeg has no CMYK -> RGB conversion */
    cinfo->out_color_space = JCS_RGB; /* gray and RGB JPEGs too */
    cinfo->scale_num = (unsigned int)ctx->scale_num;
    cinfo->scale_denom = 8;
    cinfo->dct_method = ctx->fast ? JDCT_IFAST : JDCT_ISLOW;
    cinfo->do_fancy_upsampling = ctx->fast ? FALSE : TRUE;
    jpeg_calc_output_dimensions(cinfo);
    ctx->out_height = cinfo->output_height;
    ctx->out_width = cinfo->output_width;
    return 0;
}

/* Whether libjpeg will apply interblock smoothing: progressive JPEGs whose coefficients are not
 * all fully known (a truncated file, or a scan script that never finishes refining), as its
 * smoothing_ok() decides. libjpeg-turbo 2.1's smoothing gives different pixels in the first
 * iMCU columns of a region cropped at a non-zero x (measured on 2.1.5: up to +-9), so for those
 * files we do not crop horizontally; the vertical skip is exact. Conservative: any coefficient
 * of any component not refined to its last bit. */
static int smoothing_active(struct jpeg_decompress_struct *cinfo)
{
    int ci, coefi;

    if (!cinfo->progressive_mode || !cinfo->do_block_smoothing || cinfo->coef_bits == NULL)
        return 0;
    for (ci = 0; ci < cinfo->num_components; ci++)
        for (coefi = 0; coefi < DCTSIZE2; coefi++)
            if (cinfo->coef_bits[ci][coefi] != 0)
                return 1;
    return 0;
}

/* Phase 2, without the GIL: decode rows y..y+h-1, columns x..x+w-1 into out (h*w*3 bytes). */
static int decode_rows(crop_ctx *ctx, unsigned char *out)
{
    struct jpeg_decompress_struct *cinfo = &ctx->cinfo;
    JDIMENSION full_width = ctx->out_width, left, right, crop_x, crop_w, r, i, got;
    JSAMPARRAY rows;
    size_t row_bytes = (size_t)ctx->w * 3;

    if (setjmp(ctx->err.jump))
        return -1;
    jpeg_start_decompress(cinfo); /* progressive: entropy-decodes the whole file here */

    left = ctx->x >= CROP_MARGIN ? ctx->x - CROP_MARGIN : 0;
    right = ctx->x + ctx->w + CROP_MARGIN <= full_width ? ctx->x + ctx->w + CROP_MARGIN : full_width;
    if (right - left < CROP_MIN_WIDTH) {
        right = left + CROP_MIN_WIDTH <= full_width ? left + CROP_MIN_WIDTH : full_width;
        left = right >= CROP_MIN_WIDTH ? right - CROP_MIN_WIDTH : 0;
    }
    if (smoothing_active(cinfo)) {
        left = 0; /* see smoothing_active: decode whole rows (still skipping rows above/below) */
        right = full_width;
    }
    crop_x = left;
    crop_w = right - left;
    /* Moves crop_x down to an iMCU boundary and widens crop_w to match; output_width becomes
     * crop_w. A no-op when the full width is asked for. */
    jpeg_crop_scanline(cinfo, &crop_x, &crop_w);

    /* A block of rows per jpeg_read_scanlines call (one row per call costs ~10% at 224^2: the
     * merged/fancy 2-row upsamplers go through their spare row). As wide as the uncropped image:
     * libjpeg-turbo < 2.0.7 could write a full uncropped row with merged upsampling, and it costs
     * nothing. Freed by jpeg_abort_decompress / jpeg_destroy_decompress. */
    rows = (*cinfo->mem->alloc_sarray)((j_common_ptr)cinfo, JPOOL_IMAGE,
                                       full_width * (JDIMENSION)cinfo->output_components,
                                       READ_ROWS);
    if (ctx->y > 0)
        jpeg_skip_scanlines(cinfo, ctx->y);
    for (r = 0; r < ctx->h; r += got) {
        got = jpeg_read_scanlines(cinfo, rows, ctx->h - r < READ_ROWS ? ctx->h - r : READ_ROWS);
        if (got == 0) {
            snprintf(ctx->err.message, sizeof ctx->err.message,
                     "libjpeg returned no scanline at row %u", (unsigned)(ctx->y + r));
            return -1;
        }
        for (i = 0; i < got; i++)
            memcpy(out + (size_t)(r + i) * row_bytes, rows[i] + (size_t)(ctx->x - crop_x) * 3,
                   row_bytes);
    }
    /* The rows below the box are never decoded. */
    jpeg_abort_decompress(cinfo);
    return 0;
}

static void destroy(crop_ctx *ctx)
{
    if (ctx->created) {
        jpeg_destroy_decompress(&ctx->cinfo);
        ctx->created = 0;
    }
}

PyDoc_STRVAR(decode_crop_doc,
"decode_crop(data, y, x, h, w, scale_num=8, fast=False) -> bytes\n\n"
"Decodes the JPEG `data` (any bytes-like object) at scale scale_num/8 (1..8; the scaled image\n"
"is ceil(H*k/8) x ceil(W*k/8)) to RGB and returns rows y..y+h-1, columns x..x+w-1 of it as\n"
"packed RGB bytes (h*w*3), bit-identical to cropping a full decode at that scale. Only the\n"
"iMCU columns covering the box are inverse-transformed, rows below the box are not decoded.\n"
"`fast`: libjpeg's fast integer IDCT and plain (non-fancy) chroma upsampling.\n"
"Raises ValueError for undecodable data (libjpeg's message), CMYK/YCCK JPEGs, and a box\n"
"outside the scaled image; corrupt-data warnings (e.g. truncation) are not errors.");

static PyObject *decode_crop(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"data", "y", "x", "h", "w", "scale_num", "fast", NULL};
    Py_buffer view;
    int y, x, h, w, scale_num = 8, fast = 0, rc;
    crop_ctx *ctx;
    PyObject *result = NULL;
    PyThreadState *ts;

    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*iiii|ip:decode_crop", kwlist, &view, &y,
                                     &x, &h, &w, &scale_num, &fast))
        return NULL;
    if (scale_num < 1 || scale_num > 8) {
        PyErr_Format(PyExc_ValueError, "decode_crop: scale_num must be in 1..8, got %d",
                     scale_num);
        goto done_view;
    }
    if (y < 0 || x < 0 || h < 1 || w < 1) {
        PyErr_Format(PyExc_ValueError,
                     "decode_crop: need y, x >= 0 and h, w >= 1, got y=%d x=%d h=%d w=%d",
                     y, x, h, w);
        goto done_view;
    }
    if ((unsigned long long)view.len > (unsigned long long)(unsigned long)-1) {
        PyErr_SetString(PyExc_ValueError, "decode_crop: data too large");
        goto done_view;
    }
    /* Heap, zeroed: jpeg_decompress_struct is large-ish and destroy() relies on `created`. */
    ctx = PyMem_Calloc(1, sizeof(crop_ctx));
    if (ctx == NULL) {
        PyErr_NoMemory();
        goto done_view;
    }
    ctx->data = (const unsigned char *)view.buf;
    ctx->size = (unsigned long)view.len;
    ctx->scale_num = scale_num;
    ctx->fast = fast;
    ctx->y = (JDIMENSION)y;
    ctx->x = (JDIMENSION)x;
    ctx->h = (JDIMENSION)h;
    ctx->w = (JDIMENSION)w;

    ts = PyEval_SaveThread();
    rc = read_header_dims(ctx);
    PyEval_RestoreThread(ts);
    if (rc != 0) {
        PyErr_Format(PyExc_ValueError, "decode_crop: %s", ctx->err.message);
        goto done_ctx;
    }
    if (ctx->jpeg_color_space == JCS_CMYK || ctx->jpeg_color_space == JCS_YCCK) {
        PyErr_Format(PyExc_ValueError,
                     "decode_crop: %s JPEG (%ux%u, HxW): libjpeg has no conversion to RGB",
                     ctx->jpeg_color_space == JCS_CMYK ? "CMYK" : "YCCK",
                     (unsigned)ctx->image_height, (unsigned)ctx->image_width);
        goto done_ctx;
    }
    if ((unsigned long long)y + (unsigned long long)h > ctx->out_height ||
        (unsigned long long)x + (unsigned long long)w > ctx->out_width) {
        PyErr_Format(PyExc_ValueError,
                     "decode_crop: box y=%d x=%d h=%d w=%d is outside the %ux%u (HxW) image "
                     "at scale %d/8 of the %ux%u JPEG",
                     y, x, h, w, (unsigned)ctx->out_height, (unsigned)ctx->out_width,
                     scale_num, (unsigned)ctx->image_height, (unsigned)ctx->image_width);
        goto done_ctx;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)h * (Py_ssize_t)w * 3);
    if (result == NULL)
        goto done_ctx;

    ts = PyEval_SaveThread();
    rc = decode_rows(ctx, (unsigned char *)PyBytes_AS_STRING(result));
    PyEval_RestoreThread(ts);
    if (rc != 0) {
        Py_CLEAR(result);
        PyErr_Format(PyExc_ValueError, "decode_crop: %s", ctx->err.message);
    }

done_ctx:
    destroy(ctx);
    PyMem_Free(ctx);
done_view:
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_crop", (PyCFunction)(void (*)(void))decode_crop, METH_VARARGS | METH_KEYWORDS,
     decode_crop_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "data._jpeg_crop",
    "Cropped JPEG decode on libjpeg-turbo (jpeg_crop_scanline + jpeg_skip_scanlines).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__jpeg_crop(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* The libjpeg-turbo this was compiled against (2001005 = 2.1.5). */
    if (PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER",
                                LIBJPEG_TURBO_VERSION_NUMBER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
