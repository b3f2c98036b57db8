// Command govmm-demo is the default guest's HTTP service, the workload that
// shows output commit end to end:
//
//	POST /incr     -> the counter's new value, "N\n" (held in memory)
//	POST /append   -> appends the body as one line to the log file, fsyncs,
//	                  returns the number of lines, "N\n"
//	GET  /log      -> the log file
//	GET  /healthz  -> "ok\n"
//
// /init starts it with --addr :80 --log /data/log.txt and restarts it if
// it dies.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"time"
)

func main() {
	addr := flag.String("addr", ":80", "listen on `address`")
	logPath := flag.String("log", "/data/log.txt", "append lines to `file`")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: govmm-demo [--addr :80] [--log FILE]\n\n"+
			"HTTP service of the govmm guest: POST /incr, POST /append, GET /log, GET /healthz.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	log.SetPrefix("govmm-demo: ")
	log.SetFlags(0)

	s, err := openService(*logPath)
	if err != nil {
		log.Fatal(err)
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
	os.Exit(1)
}
