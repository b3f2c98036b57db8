// Package demo is govmm-demo, the default guest's HTTP service, the
// workload that shows output commit end to end:
//
//	POST /incr     -> the counter's new value, "N\n" (held in memory)
//	POST /append   -> appends the body as one line to the log file, fsyncs,
//	                  returns the number of lines, "N\n"
//	GET  /log      -> the log file
//	GET  /healthz  -> "ok\n"
//
// /init starts it with --addr :80 --log /data/log.txt and restarts it if
// it dies. It is no binary of its own: the guest's one multi-call binary
// (/init, package guestimg/guest/init) runs Main when called as
// govmm-demo (/bin/govmm-demo is a symbolic link to /init).
package demo

import (
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"
)

// Main runs the service with the command-line arguments args (without
// argv[0]) and returns the exit status: it returns only when the service
// cannot start or stops serving.
func Main(args []string) int {
	fs := flag.NewFlagSet("govmm-demo", flag.ContinueOnError)
	addr := fs.String("addr", ":80", "listen on `address`")
	logPath := fs.String("log", "/data/log.txt", "append lines to `file`")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: govmm-demo [--addr :80] [--log FILE]\n\n"+
			"HTTP service of the govmm guest: POST /incr, POST /append, GET /log, GET /healthz.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	log.SetPrefix("govmm-demo: ")
	log.SetFlags(0)

	s, err := openService(*logPath)
	if err != nil {
		log.Print(err)
		return 1
	}
	srv := &http.Server{
		Addr:              *addr,
		Handler:           s.handler(),
		ReadHeaderTimeout: 10 * time.Second,
		// No idle timeout: replication tests hold keep-alive connections
		// across failover.
	}
	err = srv.ListenAndServe()
	log.Print(err)
	return 1
}
