/* Statuses and this thread's last-error message, shared by the planner (pure) and the driver code. */
#ifndef SGMV_ERRORS_H
#define SGMV_ERRORS_H

/* Sets this thread's last-error message; returns status. */
int sgmv_set_error(int status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#endif
